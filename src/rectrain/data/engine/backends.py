"""Engines that run the preprocessing pipeline: DuckDB embedded (the default) or Spark.

The pipeline itself (:mod:`rectrain.data.engine.pipeline`) is written once in Ibis; this module
owns what differs per engine: how to connect (memory cap, spill folder, threads), how to keep an
intermediate result (a DuckDB temp table, a cached Spark DataFrame) so that an iterative step
does not grow an ever longer query plan, and how to stream a result out as Arrow batches.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rectrain.errors import ConfigError
from rectrain.utils.io import remove_stale_temporaries, temp_prefix

log = logging.getLogger(__name__)

ENGINES = ("duckdb", "spark")


@dataclass
class EngineConfig:
    """Which engine prepares the data, and with what resources (``data.engine.*``).

    Attributes:
        name: ``duckdb`` (embedded, out-of-core, no server) or ``spark`` (a cluster, or ``local[N]``).
        memory_limit: DuckDB's memory cap (``"4GB"``); beyond it DuckDB spills to a temporary folder
            inside the cache directory (removed afterwards, or by the next run if this one is killed).
        threads: DuckDB worker threads (None: all cores).
        master: Spark master URL (``local[2]``, ``spark://host:7077``, ``yarn``).
        spark_conf: extra Spark settings (``spark.executor.memory``, ...).
    """

    name: str = "duckdb"
    memory_limit: str = "4GB"
    threads: int | None = None
    master: str = "local[2]"
    spark_conf: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError("data.engine.name", f"must be one of {', '.join(ENGINES)}, got {self.name!r}")
        self.spark_conf = {str(k): str(v) for k, v in dict(self.spark_conf).items()} if self.spark_conf else None
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError("data.engine.threads", f"must be >= 1 or null, got {self.threads}")


class Engine:
    """A connected Ibis backend plus the few operations the pipeline needs beyond Ibis itself."""

    def __init__(self, con: Any, name: str, workdir: Path) -> None:
        self.con, self.name, self.workdir = con, name, workdir
        self._names = itertools.count()
        self._kept: list[Any] = []

    # --- intermediate results -----------------------------------------------------------------
    def keep(self, expr: Any) -> Any:
        """Compute ``expr`` once and return a table reading the result (an iterative step's input)."""
        name = f"rectrain_step_{next(self._names)}"
        if self.name == "duckdb":  # a table in the scratch database file: paged to disk, not held in memory
            return self.con.create_table(name, expr)
        # computed now, its lineage cut: the next step's plan starts from this result, not from the log
        frame = self.con._session.sql(self._sql(expr)).localCheckpoint(eager=True)
        self._kept.append(frame)
        frame.createOrReplaceTempView(name)
        return self.con.table(name)

    def keep_in_parts(self, parts: list[Any]) -> Any:
        """Like :meth:`keep` for the union of ``parts``, computed one part at a time (DuckDB: each
        part's sort and spill bounded by the part; Spark partitions by itself: one union)."""
        if self.name != "duckdb" or len(parts) == 1:
            return self.keep(parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]))
        name = f"rectrain_step_{next(self._names)}"
        table = self.con.create_table(name, parts[0])
        for part in parts[1:]:
            self.con.insert(name, part)
        return table

    def partition(self, expr: Any, key: Any, parts: int, dense: bool = False) -> "Parts":
        """``expr`` split into ``parts`` tables by the integer expression ``key`` (values 0..parts-1).

        DuckDB: one pass writes each part into the scratch folder, and each part is then read alone.
        Filtering the whole result once per part would read it ``parts`` times: at a billion events
        that is the whole log (tens of GB) from disk again for every part. ``dense``: every column is
        a number that is never null (the final sort's codes, times, labels, positions), so the pass
        buckets the streamed rows in numpy into one raw file per part and column, which DuckDB then
        scans in place; else a Parquet file set per part. Spark partitions its own work: the parts
        are filters.
        """
        if parts == 1:
            return Parts([expr])
        if self.name != "duckdb":
            return Parts([expr.filter(key == p) for p in range(parts)])
        if dense:
            columns = list(expr.columns)

            def split(batch: Any) -> tuple[dict[str, Any], Any]:
                return ({c: batch.column(i) for i, c in enumerate(columns)}, batch.column(len(columns)).to_numpy())

            return self.partition_batches(expr.mutate(_part=key.cast("int32")), split, parts)
        folder = self.workdir / f"rectrain_parts_{next(self._names)}"
        self.con.to_parquet(expr.mutate(_part=key.cast("int64")), folder, partition_by="_part")
        tables = []
        for p in range(parts):
            files = folder / f"_part={p}"
            tables.append(self.con.read_parquet(str(files / "*.parquet"), hive_partitioning=False)
                          .select(*expr.columns) if files.is_dir() else None)
        return Parts(tables, folder)

    def partition_batches(self, expr: Any, split: Any, parts: int) -> "Parts":
        """DuckDB: the rows of ``expr`` streamed out and bucketed in numpy. ``split(batch)`` gives a
        batch's columns as they are to be stored (name -> Arrow or numpy array of numbers, never
        null) and each row's part (0..parts-1); each part's rows go to one raw ``<part>.<column>``
        file per column, and each part is then an Arrow table over its memory-mapped files,
        registered with DuckDB and scanned in place. The 32 blocks of 1B events: written in 77.1 s
        against 95.0 s by DuckDB's partitioned Parquet writer, sorted alike (`bench/engine_steps.py
        --steps blocks`)."""
        import numpy as np

        folder = self.workdir / f"rectrain_parts_{next(self._names)}"
        folder.mkdir()
        handles: dict[tuple[int, str], Any] = {}
        dtypes: dict[str, np.dtype] = {}
        try:
            for batch in self.batches(expr, rows=PARTITION_BATCH_ROWS):
                columns, part = split(batch)
                # a radix sort for 16-bit keys: 5 ms per 2^20 rows against 33 ms for int32's merge sort
                order = np.argsort(part.astype(np.int16) if parts <= 2**15 else part, kind="stable")
                bounds = np.r_[0, np.cumsum(np.bincount(part, minlength=parts))]
                filled = np.flatnonzero(np.diff(bounds))
                for column, values in columns.items():
                    if getattr(values, "null_count", 0):
                        raise ValueError(f"column {column} holds nulls: not a dense partition")
                    values = np.asarray(values)[order]
                    dtypes.setdefault(column, values.dtype)
                    for p in filled:
                        if (p, column) not in handles:
                            handles[p, column] = open(folder / f"{p}.{column}", "wb")
                        handles[p, column].write(memoryview(values[bounds[p]:bounds[p + 1]]).cast("B"))
        finally:
            for handle in handles.values():
                handle.close()
        names = list(dtypes)
        tables: list[Any] = []
        for p in range(parts):
            if not names or (p, names[0]) not in handles:
                tables.append(None)
                continue
            tables.append(self._register_arrow(_mapped_table(folder, p, names, dtypes), f"rectrain_part_{p}_"))
        return Parts(tables, folder, files=lambda p: [folder / f"{p}.{c}" for c in names], forget=self._forget)

    def _register_arrow(self, table: Any, prefix: str) -> Any:
        """A DuckDB view over an Arrow table (scanned in place, no copy)."""
        name = f"{prefix}{next(self._names)}"
        self.con.con.register(name, table)
        return self.con.table(name)

    def _forget(self, table: Any) -> None:
        with contextlib.suppress(Exception):
            self.con.con.unregister(table.get_name().rsplit(".", 1)[-1])

    def release(self, table: Any) -> None:
        """Free an intermediate result that no later step reads (disk space at a billion events)."""
        if self.name != "duckdb":
            return  # Spark: checkpoints are freed with the session's scratch folder
        try:
            name = table.get_name().rsplit(".", 1)[-1]  # "<database>.main.<name>" -> "<name>"
        except Exception:  # not a stored table (an expression over one): nothing to free
            return
        if name.startswith("rectrain_step_"):
            self.con.drop_table(name, force=True)

    def memory_bytes(self) -> int | None:
        """DuckDB's memory cap in bytes, as DuckDB itself reads ``memory_limit`` (None on Spark,
        whose executors size their own work)."""
        if self.name != "duckdb":
            return None
        (text,), = self.con.con.sql("SELECT current_setting('memory_limit')").fetchall()  # e.g. '2.7 GiB'
        number, _, unit = str(text).partition(" ")
        scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
        try:
            return int(float(number) * scale[unit])
        except (KeyError, ValueError):
            log.warning("DuckDB's memory_limit reads %r; sizing its work as if it had no cap", text)
            return None

    def hash_part(self, value: Any, parts: int) -> Any:
        """Which of ``parts`` parts a value's hash falls in (0..parts-1), the same value always the
        same part. On DuckDB its ``hash`` directly: Ibis' ``hash()`` compiles to a cast through BIT
        that cost 25 ns a row here (200M rows: 5.5 s against 0.8 s, `bench/engine_steps.py --steps
        hash`), ~35 s of a count of 1B events in 3 parts."""
        if self.name != "duckdb":
            return (value.hash() % parts).abs()
        return _duckdb_hash()(value) % parts

    def approx_distinct(self, table: Any, column: str) -> int:
        """About how many distinct values ``column`` holds (HyperLogLog). A table stored in the
        scratch database carries an estimate in its statistics (free; it errs high: 24.5M for the
        20M users of the 1B log); any other expression is scanned once (8.6 s there)."""
        import re

        if self.name == "duckdb":
            with contextlib.suppress(Exception):  # an expression, not a stored table: scanned below
                name = table.get_name().rsplit(".", 1)[-1]
                (text,), = self.con.con.sql(f'SELECT stats("{column}") FROM "{name}" LIMIT 1').fetchall()
                found = re.search(r"Approx Unique: (\d+)", str(text))
                if found:
                    return int(found.group(1))
        return int(self.scalar(table[column].approx_nunique()))

    def reads_local_files(self) -> bool:
        """Whether a file in this machine's scratch folder is readable by the engine: DuckDB and
        Spark in local mode; not a Spark cluster, whose executors run elsewhere."""
        return self.name == "duckdb" or str(self.con._session.sparkContext.master).startswith("local")

    def register(self, table: Any) -> Any:
        """An engine table holding a pyarrow Table (a log or a lookup that is already in memory)."""
        name = f"rectrain_input_{next(self._names)}"
        if self.name == "duckdb":
            return self.con.create_table(name, table)
        frame = self.con._session.createDataFrame(table).localCheckpoint(eager=True)
        self._kept.append(frame)
        frame.createOrReplaceTempView(name)
        return self.con.table(name)

    def scalar(self, expr: Any) -> Any:
        """The value of a scalar expression (a count, a max)."""
        return expr.execute()

    def batches(self, expr: Any, rows: int = 1 << 20) -> Iterator[Any]:
        """Stream ``expr``'s rows, in its order, as pyarrow RecordBatches of about ``rows`` rows."""
        if self.name == "duckdb":
            relation = self.con.con.sql(self._sql(expr))  # streamed: no copy of the whole result
            reader = relation.to_arrow_reader(rows) if hasattr(relation, "to_arrow_reader") else \
                relation.fetch_arrow_reader(rows)
            yield from prefetched(reader)
            return
        yield from expr.to_pyarrow_batches(chunk_size=rows)

    def _sql(self, expr: Any) -> str:
        import ibis

        return str(ibis.to_sql(expr, dialect="duckdb" if self.name == "duckdb" else "pyspark"))

    def close(self) -> None:
        for frame in self._kept:
            frame.unpersist()
        self._kept.clear()
        if self.name == "duckdb":
            self.con.disconnect()
        shutil.rmtree(self.workdir, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _duckdb_hash() -> Any:
    """DuckDB's own ``hash`` (an unsigned 64-bit value) as an Ibis function."""
    import ibis
    import ibis.expr.datatypes as dt

    def duckdb_hash(value):  # type: ignore[no-untyped-def]
        """DuckDB's hash of any value."""

    duckdb_hash.__annotations__ = {"return": dt.UInt64}  # a type, not this module's postponed string
    return ibis.udf.scalar.builtin(duckdb_hash, name="hash")


def prefetched(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``batches`` pulled by a thread, up to ``depth`` ahead: the engine produces the next batch
    (it releases the GIL) while the caller works on this one (at 100M events, 2 of 14 s of a sorted
    stream). The thread stops when the caller does, however it stops."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def pump() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(end)
        except BaseException as exc:  # the engine's error, raised in the caller's thread
            ready.put(exc)

    thread = threading.Thread(target=pump, name="rectrain-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pump waiting on a full queue, then let it finish
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


#: rows per batch the dense partition buckets at a time
PARTITION_BATCH_ROWS = 1 << 20

#: rows per Arrow batch of a memory-mapped part: DuckDB scans an Arrow table batch by batch, its
#: threads a batch each (a 32M-row block sorted in 7.5 s over 2^17-row batches, 11.7 s as one)
MAPPED_BATCH_ROWS = 1 << 17


def _mapped_table(folder: Path, part: int, columns: list[str], dtypes: dict[str, Any]) -> Any:
    import numpy as np
    import pyarrow as pa

    table = pa.table({c: np.memmap(folder / f"{part}.{c}", dtype=dtypes[c], mode="r") for c in columns})
    return pa.Table.from_batches(table.to_batches(max_chunksize=MAPPED_BATCH_ROWS))


class Parts:
    """The parts of :meth:`Engine.partition`: ``tables[p]`` (None for an empty part); a part's files
    are removed by :meth:`drop` once read for the last time, and all of them by :meth:`close`.
    ``files``: a part's files (default: its Parquet folder); ``forget``: what lets go of a part's
    table before its files go."""

    def __init__(self, tables: list[Any], folder: Path | None = None, files: Any = None, forget: Any = None) -> None:
        self.tables, self.folder = tables, folder
        self._files = files or (lambda index: [folder / f"_part={index}"] if folder is not None else [])
        self._forget = forget

    def drop(self, index: int) -> None:
        table, self.tables[index] = self.tables[index], None
        if table is not None and self._forget is not None:
            self._forget(table)
        for path in self._files(index):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        for index, table in enumerate(self.tables):
            if table is not None and self._forget is not None:
                self._forget(table)
            self.tables[index] = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Parts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(cfg: EngineConfig, scratch_root: str | Path | None) -> Engine:
    """Connect the configured engine; its spill/scratch folder lives under ``scratch_root``.

    The folder is named like every rectrain temporary (pid-marked), so a run killed mid-way leaves
    nothing a later run trusts, and the next run over the same cache directory removes it.
    """
    root = Path(scratch_root) if scratch_root else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    workdir = Path(tempfile.mkdtemp(prefix=temp_prefix("engine"), suffix=".tmp", dir=root))
    try:
        if cfg.name == "duckdb":
            return Engine(_connect_duckdb(cfg, workdir), "duckdb", workdir)
        return Engine(_connect_spark(cfg, workdir), "spark", workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _connect_duckdb(cfg: EngineConfig, workdir: Path) -> Any:
    import ibis

    # Insertion order need not be preserved (less memory, more parallel): every tie is broken by the
    # explicit _order column, and every result the pipeline reads in order has an ORDER BY.
    config = {"memory_limit": str(cfg.memory_limit), "temp_directory": str(workdir / "spill"),
              "preserve_insertion_order": False}
    if cfg.threads:
        config["threads"] = int(cfg.threads)
    try:  # a database file in the scratch folder: intermediate tables live on disk, read back through the cache
        return ibis.duckdb.connect(str(workdir / "engine.duckdb"), **config)
    except Exception as exc:  # duckdb raises its own types for a bad memory_limit and the like
        raise ConfigError("data.engine", f"DuckDB refused its settings {config}: {exc}") from None


_spark_dirs: Path | None = None


def _spark_scratch() -> Path:
    """Spark's local and warehouse folders: one per process, like its session (the JVM outlives a run
    of the pipeline, so they cannot live in a per-run folder); removed when the process exits."""
    global _spark_dirs
    if _spark_dirs is None:
        import atexit

        _spark_dirs = Path(tempfile.mkdtemp(prefix=temp_prefix("spark"), suffix=".tmp"))
        atexit.register(shutil.rmtree, _spark_dirs, True)
    return _spark_dirs


def _connect_spark(cfg: EngineConfig, workdir: Path) -> Any:
    try:
        import ibis
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ConfigError("data.engine.name", f"spark needs pyspark ({exc}); pip install -e '.[spark]'") from None
    scratch = _spark_scratch()
    builder = (SparkSession.builder.master(cfg.master).appName("rectrain-preprocess")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.warehouse.dir", str(scratch / "warehouse"))
               .config("spark.local.dir", str(scratch / "local"))
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.shuffle.partitions", os.environ.get("RECTRAIN_SPARK_PARTITIONS", "8")))
    for key, value in (cfg.spark_conf or {}).items():
        builder = builder.config(str(key), str(value))
    session = builder.getOrCreate()
    return ibis.pyspark.connect(session)
