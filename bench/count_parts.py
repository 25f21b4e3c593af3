"""A count per id (events and first file position, as k-core takes it) in one piece or in parts of
the ids' hash, on DuckDB: where splitting pays (many ids) and where it does not (few).

    python bench/count_parts.py --log /data/scale/log-1000000000 --parts 1,4,8 --memory-limit 3GB

The log is a folder of Parquet files (``bench/scale.py --stages generate``); each (column, parts)
runs on a fresh in-memory connection, and the table printed is seconds per row.
"""
from __future__ import annotations

import argparse
import tempfile
import time


def count_seconds(log: str, column: str, parts: int, memory_limit: str) -> tuple[float, int]:
    """Seconds to count events per id of ``column`` in ``parts`` hash parts, and the ids counted."""
    import duckdb

    with tempfile.TemporaryDirectory(prefix="count-parts-") as spill:
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": spill,
                                     "preserve_insertion_order": False})
        source = f"read_parquet('{log}/*.parquet', file_row_number=true)"
        start, ids = time.perf_counter(), 0
        for part in range(parts):
            where = f"WHERE hash({column}) % {parts} = {part}" if parts > 1 else ""
            (n,), = con.sql(f"SELECT count(*) FROM (SELECT {column}, count(*) AS n, min(file_row_number) AS f "
                            f"FROM {source} {where} GROUP BY {column})").fetchall()
            ids += n
        con.close()
        return time.perf_counter() - start, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True)
    parser.add_argument("--columns", default="user_id,item_id")
    parser.add_argument("--parts", default="1,4,8")
    parser.add_argument("--memory-limit", default="3GB")
    args = parser.parse_args()
    print("| column | ids | parts | seconds |\n|---|---:|---:|---:|")
    for column in args.columns.split(","):
        for parts in (int(p) for p in args.parts.split(",")):
            seconds, ids = count_seconds(args.log, column, parts, args.memory_limit)
            print(f"| {column} | {ids:,} | {parts} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
