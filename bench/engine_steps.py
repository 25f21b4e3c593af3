"""Choices of the DuckDB pipeline measured side by side, each repeated, on a generated log:

* ``sort``: the final sort of 250M events in one piece against 8 blocks of consecutive users
  (~31M events each, what ``SORT_BLOCK_EVENTS`` gives past ``SINGLE_SORT_EVENTS``), streamed out in
  batches of 2^18 rows as the pipeline reads them;
* ``count``: k-core's count per id (events and first file position) over a table of the log in the
  database file, in one piece against 2, 3, 4 and 8 parts of the ids' hash for users (20M at 1B
  events), and against 4 parts for items (1M);
* ``blocks``: the pass that writes the final sort's 32 blocks (the events joined with both
  vocabularies) and the sorts of the blocks: DuckDB's partitioned Parquet writer against numpy
  buckets in raw files per block and column (the pipeline's dense partition), beside the join alone;
* ``hash``: the part of a value by DuckDB's ``hash`` against Ibis' ``hash()`` (no log read);
* ``dedup``: dedup's window (first event per (user, item) by time and file position) over the whole
  log as scanned, ids and file positions as int64 against int32, and times as int32 too (what the
  scan gives when they fit), each result written to a table as the pipeline keeps it.

    python bench/scale.py --events 1000000000 --stages generate --workdir /data/scale --keep
    python bench/engine_steps.py --log /data/scale/log-1000000000 --steps sort,count,blocks,hash
    python bench/engine_steps.py --log /data/scale/log-1000000000 --steps dedup --repeats 1

Each step runs on one connection with a 3GB cap (``--memory-limit``) and spill in a temporary
folder; the variants alternate, so a slow moment of a shared machine hits each of them.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _drain(con, sql: str) -> int:
    """Rows of ``sql`` streamed as the pipeline streams them (the sort's merge runs as it is read)."""
    relation = con.sql(sql)
    reader = relation.to_arrow_reader(1 << 18) if hasattr(relation, "to_arrow_reader") else \
        relation.fetch_record_batch(1 << 18)
    return sum(batch.num_rows for batch in reader)


def sort_step(con, log: Path, repeats: int) -> None:
    files = sorted(log.glob("*.parquet"))[:25]  # 25 files of 10M rows: 250M events
    users = 5_000_000
    con.execute(f"CREATE OR REPLACE TABLE block AS SELECT (user_id % {users})::INT AS u, item_id::INT AS i, ts, "
                f"file_row_number AS o FROM read_parquet({[str(f) for f in files]}, file_row_number=true)")
    (rows,), = con.sql("SELECT count(*) FROM block").fetchall()
    print(f"| sort of {rows:,} events | seconds |\n|---|---:|")
    for rep in range(repeats):
        start = time.perf_counter()
        _drain(con, "SELECT u, i, ts FROM block ORDER BY u, ts, o")
        print(f"| one sort (run {rep + 1}) | {time.perf_counter() - start:.1f} |", flush=True)
        start = time.perf_counter()
        for part in range(8):
            _drain(con, f"SELECT u, i, ts FROM block WHERE u * 8 // {users} = {part} ORDER BY u, ts, o")
        print(f"| 8 blocks of consecutive users (run {rep + 1}) | {time.perf_counter() - start:.1f} |", flush=True)
    con.execute("DROP TABLE block")


def _events_table(con, log: Path) -> None:
    """The log as a table in the database file, as the pipeline's steps read the dedup step's result:
    ids, whole-second times and file positions as int32 (what the scan gives a log whose values fit)."""
    con.execute(f"CREATE OR REPLACE TABLE events AS SELECT user_id::INT AS user_id, item_id::INT AS item_id, "
                f"ts::INT AS ts, file_row_number::INT AS o FROM read_parquet('{log}/*.parquet', file_row_number=true)")


def count_step(con, log: Path, repeats: int) -> None:
    """k-core's count per id over a table in the database file, as the pipeline counts the dedup
    step's result (over the Parquet files themselves a count behaves otherwise: the 20M users of
    the 1B log took 53.8 s whole and 62.9 s in 4 parts there)."""
    _events_table(con, log)
    print("| count per id | ids | parts | seconds |\n|---|---:|---:|---:|")
    for rep in range(repeats):
        for column, variants in (("user_id", (1, 2, 3, 4, 8)), ("item_id", (1, 4))):
            for parts in variants:
                start, ids = time.perf_counter(), 0
                for part in range(parts):
                    where = f"WHERE hash({column}) % {parts} = {part}" if parts > 1 else ""
                    con.execute(f"CREATE OR REPLACE TABLE counted AS SELECT {column}, count(*) AS n, min(o) AS f "
                                f"FROM events {where} GROUP BY {column}")
                    (n,), = con.sql("SELECT count(*) FROM counted").fetchall()
                    ids += n
                print(f"| {column} (run {rep + 1}) | {ids:,} | {parts} | {time.perf_counter() - start:.1f} |",
                      flush=True)
    con.execute("DROP TABLE IF EXISTS counted")
    con.execute("DROP TABLE events")


def _sorted_blocks(con, blocks: list[str]) -> int:
    """Each block sorted by (user, time, position) and streamed out, as the pipeline writes the arrays."""
    return sum(_drain(con, f"SELECT uc, ic, ts FROM {block} ORDER BY uc, ts, o") for block in blocks)


def blocks_step(con, log: Path, repeats: int) -> None:
    """The pass that writes the final sort's blocks (the events joined with both vocabularies, codes
    by first appearance, into the 32 blocks 1B events get), then the sorts of the blocks: DuckDB's
    partitioned Parquet writer against numpy bucketing the streamed join into raw files per block
    and column, each block then scanned in place as an Arrow table over its memory-mapped files
    (the pipeline's dense partition); the join alone beside them."""
    import shutil

    import numpy as np
    import pyarrow as pa

    from rectrain.data.engine.backends import prefetched

    _events_table(con, log)
    for column, vocab in (("user_id", "users"), ("item_id", "items")):
        con.execute(f"CREATE OR REPLACE TABLE {vocab} AS SELECT {column}, (row_number() OVER (ORDER BY f) - 1)::INT "
                    f"AS code FROM (SELECT {column}, min(o) AS f FROM events GROUP BY {column})")
    (n_users,), = con.sql("SELECT count(*) FROM users").fetchall()
    joined = ("SELECT users.code AS uc, items.code AS ic, ts, o FROM events JOIN items USING (item_id) "
              "JOIN users USING (user_id)")
    keyed = f"SELECT *, (uc::BIGINT * 32 // {n_users})::INT AS _part FROM ({joined})"
    folder = Path(con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]).parent / "blocks"
    columns = ["uc", "ic", "ts", "o"]
    print("| 32 blocks | write blocks, s | sort blocks, s | MB |\n|---|---:|---:|---:|")
    for rep in range(repeats):
        start = time.perf_counter()
        con.sql(f"SELECT count(*), sum(uc), sum(ic) FROM ({joined})").fetchall()
        print(f"| join only, nothing written (run {rep + 1}) | {time.perf_counter() - start:.1f} | | |", flush=True)
        for variant in ("DuckDB partitioned Parquet", "numpy buckets, raw files"):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            start = time.perf_counter()
            if variant.startswith("DuckDB"):
                con.execute(f"COPY ({keyed}) TO '{folder}' (FORMAT parquet, PARTITION_BY (_part))")
                blocks = [f"read_parquet('{folder}/_part={p}/*.parquet')" for p in range(32)]
            else:
                handles = {(p, c): open(folder / f"{p}.{c}", "wb") for p in range(32) for c in columns}
                dtypes = {}
                for batch in prefetched(con.sql(keyed).to_arrow_reader(1 << 20)):  # as the pipeline streams
                    part = batch.column(4).to_numpy()
                    order = np.argsort(part.astype(np.int16), kind="stable")  # radix sort, as the pipeline
                    bounds = np.r_[0, np.cumsum(np.bincount(part, minlength=32))]
                    for i, c in enumerate(columns):
                        values = batch.column(i).to_numpy()[order]
                        dtypes[c] = values.dtype
                        for p in np.flatnonzero(np.diff(bounds)):
                            handles[p, c].write(memoryview(values[bounds[p]:bounds[p + 1]]).cast("B"))
                for handle in handles.values():
                    handle.close()
                blocks = []
                for p in range(32):
                    table = pa.table({c: np.memmap(folder / f"{p}.{c}", dtype=dtypes[c], mode="r") for c in columns})
                    con.register(f"block_{p}", pa.Table.from_batches(table.to_batches(max_chunksize=1 << 17)))
                    blocks.append(f"block_{p}")
            written = time.perf_counter() - start
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) >> 20
            start = time.perf_counter()
            rows = _sorted_blocks(con, blocks)
            sorted_seconds = time.perf_counter() - start
            for block in blocks:
                if block.startswith("block_"):
                    con.unregister(block)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"| {variant} (run {rep + 1}) | {written:.1f} | {sorted_seconds:.1f} | {size:,} |", flush=True)
            assert rows > 0
    for table in ("events", "users", "items"):
        con.execute(f"DROP TABLE {table}")


def hash_step(con, log: Path, repeats: int) -> None:
    """A part of 3 by a value's hash over 200M values: DuckDB's ``hash`` as it is, and as Ibis'
    ``hash()`` compiles it (a cast through BIT to a signed integer)."""
    variants = {"DuckDB hash(x) % 3": "hash(range) % 3 = 1",
                "Ibis hash(): abs(CAST(CAST(hash(x) AS BIT) AS BIGINT) % 3)":
                    "abs(CAST(CAST(hash(range) AS BIT) AS BIGINT) % 3) = 1"}
    print("| part by hash, 200M values | seconds |\n|---|---:|")
    for rep in range(repeats):
        for name, where in variants.items():
            start = time.perf_counter()
            con.sql(f"SELECT count(*) FROM range(200000000) WHERE {where}").fetchall()
            print(f"| {name} (run {rep + 1}) | {time.perf_counter() - start:.1f} |", flush=True)


def dedup_step(con, log: Path, repeats: int) -> None:
    """The window over the whole log, its rows as wide as the scan gives them: int64 ids and file
    positions, or int32, times too (the spill of a billion events: ~32, ~20, ~16 bytes an event)."""
    scan = f"read_parquet('{log}/*.parquet', file_row_number=true)"
    variants = {"int64 ids and positions": f"SELECT user_id AS u, item_id AS i, ts, file_row_number AS o FROM {scan}",
                "int32 ids and positions": f"SELECT user_id::INT AS u, item_id::INT AS i, ts, file_row_number::INT AS o "
                                           f"FROM {scan}",
                "int32 ids, positions and whole-second times":
                    f"SELECT user_id::INT AS u, item_id::INT AS i, ts::INT AS ts, file_row_number::INT AS o FROM {scan}"}
    print(f"| dedup's window over {log.name} | seconds | events kept |\n|---|---:|---:|")
    for rep in range(repeats):
        for name, rows in variants.items():
            start = time.perf_counter()
            con.execute(f"CREATE OR REPLACE TABLE kept AS SELECT * FROM ({rows}) "
                        "QUALIFY row_number() OVER (PARTITION BY u, i ORDER BY ts, o) = 1")
            seconds = time.perf_counter() - start
            (kept,), = con.sql("SELECT count(*) FROM kept").fetchall()
            con.execute("DROP TABLE kept")
            con.execute("CHECKPOINT")
            print(f"| {name} (run {rep + 1}) | {seconds:.1f} | {kept:,} |", flush=True)


def main() -> None:
    import duckdb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, required=True, help="a folder of Parquet files (--stages generate)")
    parser.add_argument("--steps", default="sort,count,blocks,hash")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="engine-steps-", dir=args.log.parent) as scratch:
        con = duckdb.connect(str(Path(scratch) / "steps.duckdb"),
                             config={"memory_limit": args.memory_limit, "temp_directory": str(Path(scratch) / "spill"),
                                     "preserve_insertion_order": False})
        for step in args.steps.split(","):
            {"sort": sort_step, "count": count_step, "blocks": blocks_step, "hash": hash_step,
             "dedup": dedup_step}[step](con, args.log, args.repeats)
        con.close()


if __name__ == "__main__":
    main()
