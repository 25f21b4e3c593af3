"""Helpers shared by the bench scripts: locating the shared datasets, timing, tables."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("RECTRAIN_BENCH_DATA", ROOT.parent / "shared" / "data"))


def require_dataset(path: Path, what: str) -> Path:
    """Exit with a clear message (status 0: nothing to measure) when a benchmark dataset is absent."""
    if not path.exists():
        print(f"skipped: {what} not found at {path}. Put the files there or set RECTRAIN_BENCH_DATA "
              f"to the folder holding it (see README, 'Benchmarks').")
        sys.exit(0)
    return path


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start
