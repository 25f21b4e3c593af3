"""Where a raw log comes from: one small class per kind, built by Hydra from ``conf/data/*.yaml``.

A source knows how to ``load()`` its RawLog and how to ``fingerprint()`` itself for the cache key:
its parameters plus the size and modification time of its files, so editing a file invalidates
the cache without hashing gigabytes on every run.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from rectrain.data.schema import RawLog


def _is_parquet(path: str, fmt: str | None) -> bool:
    """A Parquet log: declared so, a .parquet/.pq file, a directory of them, or a glob naming them."""
    if fmt is not None:
        return str(fmt).lower() in ("parquet", "pq")
    text = str(path)
    if text.endswith((".parquet", ".pq")):
        return True
    p = Path(text)
    return p.is_dir() and any(f.suffix in (".parquet", ".pq") for f in p.rglob("*") if f.is_file())


def _file_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if any(ch in str(path) for ch in "*?["):  # a glob of Parquet files: every file it matches
        return {"glob": str(path), "files": [_file_stamp(f) for f in sorted(map(Path, glob.glob(str(path),
                                                                                       recursive=True)))]}
    if not p.exists():
        return {"path": str(p), "missing": True}
    if p.is_dir():
        return {"path": str(p.resolve()), "files": [_file_stamp(f) for f in sorted(p.rglob("*")) if f.is_file()]}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _engine_scan(path: str, columns: Mapping[str, str], fmt: str | None, sep: str | None, encoding: str,
                 timestamp_format: str | None = None) -> Callable[[Any], Any]:
    """``engine -> table`` for a log file: Parquet scanned by the engine, CSV/TSV validated in chunks
    and streamed to it."""
    from rectrain.data.engine.scan import from_chunks, from_parquet
    from rectrain.data.readers import iter_interactions

    if _is_parquet(path, fmt):
        return lambda engine: from_parquet(engine, path, columns, timestamp_format)
    return lambda engine: from_chunks(engine, iter_interactions(path, columns, sep=sep, fmt=fmt, encoding=encoding,
                                                                timestamp_format=timestamp_format))


class SyntheticSource:
    """The generated default dataset (see :func:`rectrain.data.synthetic.generate_synthetic`)."""

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    def load(self) -> RawLog:
        from rectrain.data.synthetic import generate_synthetic

        return generate_synthetic(**self.params)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "synthetic", **self.params}


class InteractionFileSource:
    """Any CSV/TSV/Parquet log with a column mapping (``conf/data/interactions.yaml``)."""

    def __init__(self, path: str, columns: Mapping[str, str], sep: str | None = None, fmt: str | None = None,
                 encoding: str = "utf-8", timestamp_format: str | None = None,
                 item_features: Mapping[str, Any] | None = None) -> None:
        self.path, self.columns, self.sep, self.fmt = path, dict(columns), sep, fmt
        self.encoding, self.timestamp_format = encoding, timestamp_format
        self.item_features = dict(item_features) if item_features else None

    def load(self) -> RawLog:
        from rectrain.data.readers import read_interactions

        return read_interactions(self.path, self.columns, sep=self.sep, fmt=self.fmt, encoding=self.encoding,
                                 item_features=self.item_features, timestamp_format=self.timestamp_format)

    def engine_inputs(self) -> tuple[RawLog, Callable[[Any], Any], None]:
        """The side tables and a scan the engine runs itself: a Parquet log (file, directory or glob)
        is read there; a CSV/TSV log is validated chunk by chunk and streamed to it (any size)."""
        from rectrain.data.readers import read_item_features

        items = read_item_features(self.item_features) if self.item_features else None
        side = RawLog(interactions=pd.DataFrame(), items=items, source=str(self.path))
        return side, _engine_scan(self.path, self.columns, self.fmt, self.sep, self.encoding,
                                  self.timestamp_format), None

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "file", "file": _file_stamp(self.path), "columns": self.columns, "sep": self.sep,
                "fmt": self.fmt, "encoding": self.encoding, "timestamp_format": self.timestamp_format,
                "item_features": self.item_features,
                "item_features_file": _file_stamp(self.item_features["path"]) if self.item_features else None}


class MovieLensSource:
    """MovieLens in its original formats (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest)."""

    def __init__(self, root: str, variant: str | None = None, download: bool = False) -> None:
        self.root, self.variant, self.download = root, variant, download

    def load(self) -> RawLog:
        from rectrain.data.movielens import read_movielens

        return read_movielens(self.root, self.variant, download=self.download)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "movielens", "root": _file_stamp(self.root), "variant": self.variant}


class SessionFileSource:
    """Session click logs (``SessionId, ItemId, Time``), optionally with a predefined test period."""

    def __init__(self, path: str, test_path: str | None = None, sep: str = "\t", encoding: str = "utf-8") -> None:
        self.path, self.test_path, self.sep, self.encoding = path, test_path, sep, encoding

    def load(self) -> RawLog:
        from rectrain.data.readers import read_sessions

        return read_sessions(self.path, sep=self.sep, encoding=self.encoding)

    def load_test(self) -> RawLog | None:
        if not self.test_path:
            return None
        from rectrain.data.readers import read_sessions

        return read_sessions(self.test_path, sep=self.sep, encoding=self.encoding)

    def engine_inputs(self) -> tuple[RawLog, Callable[[Any], Any], Callable[[Any], Any] | None]:
        """Session logs are scanned by the engine itself, or streamed to it (see :class:`InteractionFileSource`)."""
        from rectrain.data.readers import SESSION_COLUMNS

        def scan(path: str) -> Callable[[Any], Any]:
            return _engine_scan(path, SESSION_COLUMNS, None if _is_parquet(path, None) else "csv", self.sep,
                                self.encoding)

        side = RawLog(interactions=pd.DataFrame(), source=str(self.path))
        return side, scan(self.path), scan(self.test_path) if self.test_path else None

    def fingerprint(self) -> dict[str, Any]:
        stamp = {"kind": "sessions", "file": _file_stamp(self.path), "sep": self.sep, "encoding": self.encoding}
        if self.test_path:
            stamp["test_file"] = _file_stamp(self.test_path)
        return stamp
