"""Readers for interaction logs: a declared column mapping in, a validated :class:`RawLog` out.

Every bad input becomes one :class:`~rectrain.errors.DataError` that names the file, the line
(1-based, the header is line 1) or Parquet row, the column and the config key to change, because
a user fixing a 20 GB log needs to know *where* to look, not a pandas traceback.

Design choices, and why:

* Delimited files are parsed by the pandas C engine (fast), after one vectorised byte scan of the
  file. The scan is what makes the errors exact: it checks the encoding (with the line of the
  first undecodable byte), finds rows with too few *or* too many fields (pandas silently pads short
  rows and, with ``usecols``, ignores long ones) and records blank lines, so a row index maps back
  to a physical line number. It works on numpy views of 4 MiB blocks: no Python loop over rows.
  Files containing double quotes skip the field-count part of the scan (a quoted field may hold a
  separator or a newline); pandas then reads every column so rows with too many fields still fail.
* Ids are read as text, never as numbers, so ``12`` stays ``"12"`` (not ``"12.0"``) and ``08``
  keeps its zero; they come back as ``object`` columns of Python ``str`` as
  :mod:`rectrain.data.schema` declares. The C parser builds them as ``object`` (it shares one str
  per distinct value, ~2x faster and far smaller than per-row strings) and they are only trimmed
  when the scan saw padding. Numeric columns are parsed to float64 by the C parser itself; only if
  that fails is the file re-read as text, to show the offending value and its line.
* Parquet is read column-selectively, one record batch at a time, into preallocated arrays, so a
  large file never needs an Arrow copy and a pandas copy of itself at once; ids are converted in
  Arrow kernels.
* The first bad value of a column is found with ``to_numeric(errors="coerce")``/``isin`` masks
  and an ``argmax``: validation costs a few vectorised passes, whatever the file size.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from rectrain.data.schema import ITEM, RATING, SESSION, TIMESTAMP, USER, RawLog
from rectrain.errors import DataError

PathLike = str | os.PathLike[str]
ColumnRef = str | int
#: a function that turns "the n-th row (0-based) of this column is bad because ..." into a DataError
Fail = Callable[[int, str], DataError]

#: canonical interaction columns a mapping may name, and how each is parsed
INTERACTION_KINDS: dict[str, str] = {USER: "id", ITEM: "id", TIMESTAMP: "timestamp", RATING: "float", SESSION: "id"}
#: strings that mean "no value" in an id column (exports from pandas, SQL, R)
MISSING_ID_STRINGS = ("", "nan", "NaN", "NAN", "null", "NULL", "None", "<NA>")
_MISSING_ID_VALUES = [*MISSING_ID_STRINGS, None, np.nan]
SESSION_COLUMNS = {SESSION: "SessionId", ITEM: "ItemId", TIMESTAMP: "Time"}

_FORMAT_BY_EXTENSION = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_FORMAT_ALIASES = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "parquet": "parquet", "pq": "parquet"}
_DEFAULT_SEP = {"csv": ",", "tsv": "\t"}
_OPENERS: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BLOCK_BYTES = 1 << 22
_PARQUET_BATCH_ROWS = 1 << 16
#: rows per chunk of a streamed delimited log: a chunk's ids as Python str are its memory (~100 MB
#: for 2^20 rows of three columns)
READ_CHUNK_ROWS = 1 << 20
_EPOCH = pd.Timestamp(0, tz="UTC")
_NUMERIC_TIME_FORMATS = ("s", "seconds", "unix", "epoch", "ms", "milliseconds")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def read_interactions(
    path: PathLike,
    columns: Mapping[str, ColumnRef],
    *,
    sep: str | None = None,
    fmt: str | None = None,
    encoding: str = "utf-8",
    item_features: Mapping[str, Any] | None = None,
    timestamp_format: str | None = None,
) -> RawLog:
    """Read a CSV/TSV/Parquet interaction log whose columns are declared by ``columns``.

    Args:
        path: the log; ``.csv``, ``.tsv``, ``.txt``, ``.parquet``/``.pq``, optionally ``.gz``/``.bz2``/``.xz``.
        columns: canonical name (``user``, ``item``, ``timestamp``, optional ``rating``, ``session``)
            -> the file's column name. ``user`` may be left out when ``session`` is given (session
            logs have no user; the session then stands for the user). For a delimited file without
            a header, give 0-based column positions (ints) instead of names.
        sep: field separator; default ``,`` for csv and tab for tsv/txt.
        fmt: ``csv``, ``tsv`` or ``parquet``; inferred from the extension when ``None``.
        encoding: text encoding of a delimited file (``latin-1`` for many older exports).
        item_features: optional item side file, a mapping with ``path``, ``columns`` (``item`` and
            optionally ``title``, ``categories``), and optionally ``sep``, ``fmt``, ``encoding`` and
            ``category_sep`` (default ``|``) that splits the categories field into a list.
        timestamp_format: ``None``/``"s"`` numeric seconds, ``"ms"`` numeric milliseconds,
            ``"iso"`` ISO-8601 datetimes, or a strftime format such as ``"%Y-%m-%d %H:%M:%S"``.
            Datetimes without a zone are taken as UTC.

    Returns:
        A RawLog with columns ``user, item, timestamp`` (+ ``rating``, ``session`` when mapped);
        ids ``str`` in ``object`` columns, timestamp and rating ``float64``, rows in file order.

    Raises:
        DataError: for any file, mapping or value problem, naming file, line/row, column and key.
    """
    mapping = _check_interaction_mapping(columns)
    kinds = {name: INTERACTION_KINDS[name] for name in mapping}
    table = read_table(path, mapping, kinds, sep=sep, fmt=fmt, encoding=encoding, timestamp_format=timestamp_format)
    items = read_item_features(item_features) if item_features else None
    return RawLog(interactions=_canonical_interactions(table), items=items, source=str(path))


def iter_interactions(
    path: PathLike,
    columns: Mapping[str, ColumnRef],
    *,
    sep: str | None = None,
    fmt: str | None = None,
    encoding: str = "utf-8",
    timestamp_format: str | None = None,
    chunk_rows: int | None = None,
) -> Iterator[pd.DataFrame]:
    """The interactions of a delimited (CSV/TSV) log, validated ``chunk_rows`` rows at a time
    (default READ_CHUNK_ROWS).

    What :func:`read_interactions` returns, in file order, a chunk at a time: the same columns,
    checks and messages (file, exact line, column, key), with memory for one chunk whatever the
    size of the file. The preprocessing engine streams a large CSV through it into Parquet.
    """
    mapping = _check_interaction_mapping(columns)
    p = _check_file(path)
    fmt = _resolve_format(p, fmt)
    if fmt == "parquet":
        raise DataError("a Parquet log is scanned by the engine itself, not streamed here", path=str(p),
                        key="data.source.format")
    spec = _TableSpec(mapping, {name: INTERACTION_KINDS[name] for name in mapping}, timestamp_format,
                      "data.source.columns", {}, None)
    for chunk in _iter_delimited(p, spec, _separator(p, fmt, sep), encoding, chunk_rows or READ_CHUNK_ROWS):
        yield _canonical_interactions(chunk)


def read_sessions(path: PathLike, *, sep: str = "\t", encoding: str = "utf-8") -> RawLog:
    """Read a session click log with header ``SessionId, ItemId, Time`` (yoochoose / GRU4Rec format).

    The session id fills both ``session`` and ``user``: a session model treats each session as
    one anonymous user, and the rest of the pipeline only needs a ``user`` column.
    """
    p = Path(path)
    fmt = "parquet" if _infer_format_or_none(p) == "parquet" else "csv"
    table = read_table(p, SESSION_COLUMNS, {k: INTERACTION_KINDS[k] for k in SESSION_COLUMNS},
                       sep=sep, fmt=fmt, encoding=encoding)
    return RawLog(interactions=_canonical_interactions(table), source=str(path))


def read_item_features(spec: Mapping[str, Any]) -> pd.DataFrame:
    """Read an item side file into ``item`` (str), ``title`` (str), ``categories`` (list of str).

    ``spec`` is the ``data.source.item_features`` mapping documented in :func:`read_interactions`.
    Duplicate item ids are an error: two rows would give one item two different feature sets.
    """
    key = "data.source.item_features"
    if "path" not in spec or "columns" not in spec:
        raise DataError("item_features needs 'path' and 'columns' (with at least 'item')", key=key)
    mapping = dict(spec["columns"])
    unknown = sorted(set(mapping) - {ITEM, "title", "categories"})
    if ITEM not in mapping or unknown:
        raise DataError(f"item_features.columns must map 'item' and may map 'title', 'categories'; got {sorted(mapping)}",
                        key=f"{key}.columns")
    kinds = {ITEM: "id", "title": "text", "categories": "text"}
    table = read_table(spec["path"], mapping, {k: kinds[k] for k in mapping}, sep=spec.get("sep"),
                       fmt=spec.get("fmt", spec.get("format")), encoding=spec.get("encoding", "utf-8"),
                       key_prefix=f"{key}.columns", on_duplicate_id=ITEM)
    if "categories" in table:
        table["categories"] = split_categories(table["categories"], spec.get("category_sep", "|"))
    return table.reset_index(drop=True)


def split_categories(values: pd.Series, sep: str = "|", none_marker: str | None = None) -> pd.Series:
    """``"Action|Drama"`` -> ``["Action", "Drama"]``; empty (or ``none_marker``) -> ``[]``.

    Runs once per *item* (item tables are small), never per interaction.
    """
    text = values.fillna("").astype(str)
    if none_marker is not None:
        text = text.mask(text == none_marker, "")
    return pd.Series([[c.strip() for c in v.split(sep) if c.strip()] for v in text.tolist()],
                     index=values.index, dtype=object)


def read_table(
    path: PathLike,
    columns: Mapping[str, ColumnRef],
    kinds: Mapping[str, str],
    *,
    sep: str | None = None,
    fmt: str | None = None,
    encoding: str = "utf-8",
    timestamp_format: str | None = None,
    key_prefix: str | None = "data.source.columns",
    labels: Mapping[str, str] | None = None,
    on_duplicate_id: str | None = None,
) -> pd.DataFrame:
    """Read and validate the declared columns of one file; the engine behind every reader here.

    Args:
        columns: output name -> file column name (or 0-based position for headerless files).
        kinds: output name -> ``id`` (non-empty stripped str), ``float`` (finite number),
            ``timestamp`` (seconds, see ``timestamp_format``) or ``text`` (str, may be empty).
        key_prefix: config key prefix named in mapping errors (``data.source.columns`` -> ``data.source.columns.user``);
            ``None`` for fixed formats the user does not configure.
        labels: how to name a column in messages when the file has no header (MovieLens ``u.data``).
        on_duplicate_id: an ``id`` column that must be unique (item side files).

    Returns:
        A DataFrame with the output names as columns, in file order, on a RangeIndex.
    """
    p = _check_file(path)
    fmt = _resolve_format(p, fmt)
    spec = _TableSpec(dict(columns), dict(kinds), timestamp_format, key_prefix, dict(labels or {}), on_duplicate_id)
    if fmt == "parquet":
        return _read_parquet(p, spec)
    return _read_delimited(p, spec, _separator(p, fmt, sep), encoding)


# --------------------------------------------------------------------------------------------
# mapping and file checks
# --------------------------------------------------------------------------------------------


@dataclass
class _TableSpec:
    """What to read from a file and how to report problems with it."""

    columns: dict[str, ColumnRef]
    kinds: dict[str, str]
    timestamp_format: str | None
    key_prefix: str | None
    labels: dict[str, str]
    unique_id: str | None

    def key(self, name: str) -> str | None:
        return f"{self.key_prefix}.{name}" if self.key_prefix else None

    def label(self, name: str) -> str:
        """The column as the user knows it: its header name, or a label/position for headerless files."""
        ref = self.columns[name]
        if isinstance(ref, str):
            return ref
        return self.labels.get(name, f"field {ref + 1}")


def _check_interaction_mapping(columns: Mapping[str, ColumnRef]) -> dict[str, ColumnRef]:
    """Reject unknown canonical names and missing required ones before touching the file."""
    mapping = dict(columns)
    for name in mapping:
        if name not in INTERACTION_KINDS:
            raise DataError(f"unknown column role '{name}'; allowed: {', '.join(INTERACTION_KINDS)}",
                            key=f"data.source.columns.{name}")
    for name in (ITEM, TIMESTAMP):
        if name not in mapping:
            raise DataError(f"the column mapping has no '{name}'; set it to the file's {name} column",
                            key=f"data.source.columns.{name}")
    if USER not in mapping and SESSION not in mapping:
        raise DataError("the column mapping needs 'user' (or 'session' for session logs without users)",
                        key="data.source.columns.user")
    for name, ref in mapping.items():
        if isinstance(ref, bool) or not isinstance(ref, (str, int)) or ref == "" or (isinstance(ref, int) and ref < 0):
            raise DataError(f"must be a column name (or a 0-based position for headerless files), got {ref!r}",
                            key=f"data.source.columns.{name}")
    return mapping


def _check_file(path: PathLike) -> Path:
    """Missing, directory or 0-byte input: say so before any parser produces a cryptic message."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found; check the configured path (relative paths start at the working "
                        "directory) and that the file exists", path=str(p))
    if p.is_dir():
        raise DataError("is a directory, expected a data file", path=str(p))
    if p.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes); it needs a header line and at least one data row",
                        path=str(p))
    return p


def _split_compression(p: Path) -> tuple[str, str | None]:
    """The format extension and the compression extension (``.csv.gz`` -> ``(".csv", ".gz")``)."""
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _infer_format_or_none(p: Path) -> str | None:
    return _FORMAT_BY_EXTENSION.get(_split_compression(p)[0])


def _resolve_format(p: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt.lower() not in _FORMAT_ALIASES:
            raise DataError(f"unknown format {fmt!r}; use csv, tsv or parquet", path=str(p), key="data.source.format")
        return _FORMAT_ALIASES[fmt.lower()]
    found = _infer_format_or_none(p)
    if found is None:
        raise DataError(f"cannot tell the format from the extension {''.join(p.suffixes)!r}; "
                        "set data.source.format to csv, tsv or parquet", path=str(p), key="data.source.format")
    return found


def _separator(p: Path, fmt: str, sep: str | None) -> str:
    """The declared separator, or the format's own (``,`` for csv, tab for tsv)."""
    sep = sep if sep is not None else _DEFAULT_SEP[fmt]
    if not sep:
        raise DataError("the separator is empty", path=str(p), key="data.source.sep")
    return sep


def _open_binary(p: Path) -> IO[bytes]:
    return _OPENERS.get(_split_compression(p)[1] or "", open)(p, "rb")


def _check_header(p: Path, names: list[str], spec: _TableSpec, sep: str | None) -> dict[str, int]:
    """Resolve every declared column to a position, or explain what the header really holds."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"the header names column {name!r} twice (positions {seen[name] + 1} and {i + 1}); "
                            "rename one so every column name is unique", path=str(p), line=1, column=name)
        seen[name] = i
    positions = {}
    for out, ref in spec.columns.items():
        if isinstance(ref, int):
            if ref >= len(names):
                raise DataError(f"position {ref} is out of range: rows have {len(names)} fields (0-based positions)",
                                path=str(p), key=spec.key(out))
            positions[out] = ref
        elif ref in seen:
            positions[out] = seen[ref]
        else:
            raise DataError(_missing_column_message(ref, names, sep), path=str(p), key=spec.key(out))
    return positions


def _missing_column_message(ref: str, names: list[str], sep: str | None) -> str:
    message = f"column {ref!r} not found; available columns: {', '.join(repr(n) for n in names)}"
    stripped = {n.strip().lower(): n for n in names}
    if ref.strip().lower() in stripped:
        message += f" (did you mean {stripped[ref.strip().lower()]!r}?)"
    if sep is not None and len(names) == 1:
        for guess in (",", "\t", ";", "|"):
            if guess != sep and guess in names[0]:
                message += f"; the header has a single field, is the separator {guess!r}? Then set data.source.sep"
                break
    return message


# --------------------------------------------------------------------------------------------
# delimited files
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where the data rows of a delimited file sit, from the byte scan."""

    skipped_lines: np.ndarray  # sorted 1-based physical lines that are not data rows (header, blank lines)
    n_rows: int  # data rows (non-blank lines minus the header)
    quoted: bool  # the file contains quotes: line numbers may drift if a quoted field spans lines
    padded: bool = True  # spaces (or non-separator tabs) occur: ids must be stripped

    def line_of(self, row: int) -> int:
        """1-based physical line of data row ``row`` (0-based): the (row+1)-th line not skipped."""
        line = row + 1
        while True:
            nxt = row + 1 + int(np.searchsorted(self.skipped_lines, line, side="right"))
            if nxt == line:
                return line
            line = nxt


def _read_delimited(p: Path, spec: _TableSpec, sep: str, encoding: str) -> pd.DataFrame:
    (table,) = _iter_delimited(p, spec, sep, encoding, chunk_rows=None)
    return table


def _iter_delimited(p: Path, spec: _TableSpec, sep: str, encoding: str,
                    chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """The validated columns of a delimited file, ``chunk_rows`` rows at a time (None: all at once).

    Header and byte scan first (they keep only the blank lines' numbers), then the C parser reads
    and each chunk is validated on its own: memory is one chunk, errors name the exact line.
    """
    _check_encoding_name(p, encoding)
    has_header = not all(isinstance(ref, int) for ref in spec.columns.values())
    if not has_header and any(isinstance(ref, str) for ref in spec.columns.values()):
        raise DataError("mix of column names and positions; use names (file with header) or positions (without)",
                        path=str(p), key=spec.key_prefix)
    header_line, names = _read_first_record(p, sep, encoding)
    if header_line == 0:
        raise DataError("the file has no content (only blank lines)", path=str(p))
    if not has_header:
        names = [f"field {i + 1}" for i in range(len(names))]
    positions = _check_header(p, names, spec, sep)
    layout = _scan_layout(p, sep, encoding, n_fields=len(names), first_line=header_line, has_header=has_header)
    if layout.n_rows == 0:
        raise DataError("the file has a header but no data rows", path=str(p))
    rows = 0
    for frame in _parse_delimited(p, sep, encoding, len(names), _column_dtypes(positions, spec), has_header, layout,
                                  chunk_rows):
        if chunk_rows is None and len(frame) != layout.n_rows:  # quoted fields spanning lines
            layout.quoted = True  # keep going, line numbers are approximate
        if len(frame):
            yield _validate(frame, positions, spec, _line_locator(p, spec, layout, rows), strip=layout.padded)
        rows += len(frame)
    if rows == 0:
        raise DataError("the file has a header but no data rows", path=str(p))


def _check_encoding_name(p: Path, encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}; use e.g. utf-8 or latin-1", path=str(p),
                        key="data.source.encoding") from None


def _encoding_error(p: Path, line: int | None, encoding: str, err: UnicodeDecodeError) -> DataError:
    bad = err.object[err.start:err.start + 4] if isinstance(err.object, bytes) else b""
    suggestion = "latin-1" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else "utf-8"
    return DataError(f"cannot decode byte(s) {bad!r} as {encoding} (approximate line); the file is in another "
                     f"encoding: set data.source.encoding, e.g. {suggestion}", path=str(p), line=line, key="data.source.encoding")


def _read_first_record(p: Path, sep: str, encoding: str) -> tuple[int, list[str]]:
    """The first non-blank line split into fields (quote-aware): the header, or the first row.

    Returns ``(line number, fields)``; line 0 when the file has no non-blank line.
    """
    text_encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    if not _newline_is_one_byte(encoding):  # UTF-16/32: byte lines would split characters
        with _open_binary(p) as raw, io.TextIOWrapper(raw, encoding=encoding, newline="") as text:
            try:
                first = next(((n, line) for n, line in enumerate(text, start=1) if line.strip()), None)
            except UnicodeDecodeError as err:
                raise _encoding_error(p, None, encoding, err) from None
        return (first[0], _split_line(first[1].rstrip("\r\n"), sep)) if first else (0, [])
    with _open_binary(p) as fh:
        for line_no, raw in enumerate(fh, start=1):  # stops at the first non-blank line
            try:
                line = raw.decode(text_encoding if line_no == 1 else encoding)
            except UnicodeDecodeError as err:
                raise _encoding_error(p, line_no, encoding, err) from None
            if line.strip(" \r\n" + ("" if sep == "\t" else "\t")):
                return line_no, _split_line(line.rstrip("\r\n"), sep)
    return 0, []


def _split_line(line: str, sep: str) -> list[str]:
    if len(sep) == 1:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


def _scan_layout(p: Path, sep: str, encoding: str, *, n_fields: int, first_line: int, has_header: bool) -> _Layout:
    """One vectorised pass over the raw bytes: encoding, field counts, blank lines.

    pandas cannot give any of these with a line number (it pads short rows and, reading selected
    columns, ignores long ones), so they are found here on numpy views of 4 MiB blocks.
    """
    sep_byte = _single_byte(sep, encoding)
    byte_lines = _newline_is_one_byte(encoding)  # else (UTF-16/32) only the encoding is checked
    pad_codes = [c for c in (32, 9) if bytes([c]) != sep.encode("latin-1", "ignore")]  # space, tab
    decoder = codecs.getincrementaldecoder(encoding)()
    blank_parts: list[np.ndarray] = []
    newlines_before, non_blank, quoted, padded, carry = 0, 0, False, False, b""
    with _open_binary(p) as fh:
        while True:
            block = fh.read(_BLOCK_BYTES)
            eof = not block
            _decode_block(decoder, block, eof, p, encoding, newlines_before)  # carry holds no newline
            buf = carry + block
            if not eof:
                cut = buf.rfind(b"\n") + 1
                buf, carry = buf[:cut], buf[cut:]
            if buf and byte_lines:
                quoted = quoted or b'"' in buf
                field_sep = sep_byte if not quoted else None
                blanks, n_non_blank, bad, has_pad = _scan_block(buf, newlines_before + 1, field_sep, n_fields, pad_codes)
                if bad is not None:
                    _raise_field_count(p, bad, n_fields, has_header)
                blank_parts.append(blanks)
                non_blank += n_non_blank
                padded = padded or has_pad
                newlines_before += buf.count(b"\n")
            if eof:
                break
    header = np.array([first_line] if has_header else [], dtype=np.int64)
    skipped = np.unique(np.concatenate([header, *blank_parts])) if blank_parts else header
    if not byte_lines:  # rows unknown here: let pandas count them, line numbers approximate
        return _Layout(skipped_lines=header, n_rows=-1, quoted=True)
    return _Layout(skipped_lines=skipped, n_rows=non_blank - int(has_header), quoted=quoted, padded=padded)


def _newline_is_one_byte(encoding: str) -> bool:
    return "\n".encode(encoding) == b"\n"


def _single_byte(sep: str, encoding: str) -> int | None:
    """The separator as one byte when newline and separator are single bytes in this encoding."""
    try:
        encoded, newline = sep.encode(encoding), "\n".encode(encoding)
    except UnicodeEncodeError:
        return None
    return encoded[0] if len(encoded) == 1 and newline == b"\n" else None


def _decode_block(decoder: codecs.IncrementalDecoder, block: bytes, eof: bool, p: Path, encoding: str,
                  lines_before: int) -> None:
    try:
        decoder.decode(block, final=eof)
    except UnicodeDecodeError as err:
        line = lines_before + block.count(b"\n", 0, max(err.start, 0)) + 1
        raise _encoding_error(p, line, encoding, err) from None


def _scan_block(buf: bytes, first_line: int, sep_byte: int | None, n_fields: int,
                pad_codes: list[int]) -> tuple[np.ndarray, int, tuple[int, int] | None, bool]:
    """Scan whole lines: blank line numbers, non-blank count, ``(line, fields)`` of the first bad
    row, and whether any padding (space, non-separator tab) occurs.

    A line is blank when it holds only spaces, tabs (unless tab separates) and ``\r``, the rule
    pandas uses to skip it. Field counts are only checked when ``sep_byte`` is given.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    if not buf.endswith(b"\n"):
        ends = np.append(ends, arr.size)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    lines = first_line + np.arange(ends.size, dtype=np.int64)
    pad = np.zeros(arr.size, dtype=bool)
    for code in pad_codes:
        pad |= arr == code
    white_pos = np.flatnonzero(pad | (arr == 13))
    blank = np.searchsorted(white_pos, ends) - np.searchsorted(white_pos, starts) == ends - starts
    bad = None
    if sep_byte is not None:
        sep_pos = np.flatnonzero(arr == sep_byte)
        fields = np.searchsorted(sep_pos, ends) - np.searchsorted(sep_pos, starts) + 1
        wrong = ~blank & (fields != n_fields)
        if wrong.any():
            first = int(np.argmax(wrong))
            bad = (int(lines[first]), int(fields[first]))
    return lines[blank], int((~blank).sum()), bad, bool(pad.any())


def _raise_field_count(p: Path, bad: tuple[int, int], n_fields: int, has_header: bool) -> None:
    line, got = bad
    what = "the header has" if has_header else "the first row has"
    raise DataError(f"row has {got} field(s) but {what} {n_fields}; fix or remove this row "
                    "(a missing or extra separator shifts every later value)", path=str(p), line=line)


def _parse_delimited(p: Path, sep: str, encoding: str, n_fields: int, dtypes: dict[int, str], has_header: bool,
                     layout: _Layout, chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """Parse the declared columns with the C engine (python engine for multi-character separators),
    ``chunk_rows`` rows at a time (None: one frame).

    Numeric columns are parsed as float64 by the C parser itself (to_numeric on strings is ~10x
    slower); if any value of a chunk does not parse, the file is re-read as text from that chunk
    on, so validation can show the offending value and its line. Ids are read as text: ``12``
    stays ``"12"``. When the scan could not count fields (quotes, multi-character separator) every
    column is read, so pandas itself rejects rows with too many fields.
    """
    usecols = sorted(dtypes)
    counted = not layout.quoted and _single_byte(sep, encoding) is not None
    multi = len(sep) > 1
    options = dict(
        sep=re.escape(sep) if multi else sep, engine="python" if multi else "c",
        header=0 if has_header else None, names=list(range(n_fields)), index_col=False,
        usecols=usecols if counted else None, na_filter=False, encoding=encoding,
        skip_blank_lines=True, compression="infer",
    )

    def frames(dtype: Any) -> Iterator[pd.DataFrame]:
        if chunk_rows is None:
            yield pd.read_csv(p, dtype=dtype, **options)
            return
        with pd.read_csv(p, dtype=dtype, chunksize=chunk_rows, **options) as reader:
            yield from reader

    done = 0
    try:
        try:
            for frame in frames(dtypes):
                yield frame if counted else frame[usecols]
                done += 1
        except pd.errors.ParserError:
            raise
        except ValueError:  # a numeric column of chunk `done` holds text: from there on, read as text
            for index, frame in enumerate(frames(object)):
                if index >= done:
                    yield frame if counted else frame[usecols]
    except UnicodeDecodeError as err:  # the scan decodes first; this is a safety net
        raise _encoding_error(p, None, encoding, err) from None
    except pd.errors.ParserError as err:
        found = re.search(r"line (\d+)", str(err))
        line = int(found.group(1)) if found else None
        detail = re.sub(r"^Error tokenizing data\. C error: ", "", str(err)).strip()
        raise DataError(f"cannot parse the file as delimited text ({detail}); check the separator "
                        "(data.source.sep) and that every row has as many fields as the header", path=str(p),
                        line=line) from None


def _column_dtypes(positions: dict[str, int], spec: _TableSpec) -> dict[int, str]:
    """float64 for numbers the C parser can convert, ``object`` text otherwise.

    ``object`` rather than pandas' string dtype: the C parser then shares one Python str per
    distinct id (a 20M-row log holds a few hundred thousand distinct ids) and it is ~2x faster.
    """
    numeric_ts = (spec.timestamp_format or "s").strip().lower() in _NUMERIC_TIME_FORMATS
    dtypes: dict[int, str] = {}
    for name, pos in positions.items():
        kind = spec.kinds[name]
        numeric = kind == "float" or (kind == "timestamp" and numeric_ts)
        # a column mapped twice (e.g. user and session) is read once; text wins
        dtypes[pos] = "float64" if numeric and dtypes.get(pos, "float64") == "float64" else "object"
    return dtypes


def _line_locator(p: Path, spec: _TableSpec, layout: _Layout, offset: int = 0) -> Callable[[str], Fail]:
    """Errors for delimited files carry the physical line of the row (header = line 1); ``offset``:
    the data rows before this chunk."""
    caveat = "; line numbers may be approximate: a quoted field spans several lines" if layout.quoted else ""

    def for_column(name: str) -> Fail:
        def fail(row: int, message: str) -> DataError:
            return DataError(message + caveat, path=str(p), line=layout.line_of(offset + row),
                             column=spec.label(name))
        return fail

    return for_column


def _validate(frame: pd.DataFrame, positions: dict[str, int], spec: _TableSpec,
              location: Callable[[str], Fail], strip: bool = True) -> pd.DataFrame:
    """Convert every declared column by its kind; the first bad value raises with its location."""
    out = {}
    for name, pos in positions.items():
        out[name] = _convert(frame[pos], spec.kinds[name], location(name), spec.timestamp_format, strip)
    table = _frame(out)
    if spec.unique_id is not None:
        duplicated = table[spec.unique_id].duplicated().to_numpy()
        if duplicated.any():
            row = int(np.argmax(duplicated))
            raise location(spec.unique_id)(row, f"id {table[spec.unique_id].iat[row]!r} appears twice; "
                                                "keep one row per id")
    return table


# --------------------------------------------------------------------------------------------
# value conversion (shared by delimited and Parquet input)
# --------------------------------------------------------------------------------------------


def _convert(values: pd.Series, kind: str, fail: Fail, timestamp_format: str | None,
             strip: bool = True) -> np.ndarray:
    if kind == "id":
        return _to_ids(values, fail, strip)
    if kind == "float":
        return _to_floats(values, fail, what="a number")
    if kind == "timestamp":
        return _to_seconds(values, fail, timestamp_format)
    if kind == "text":
        return values.fillna("").astype(str).to_numpy(dtype=object)
    raise ValueError(f"unknown column kind {kind!r}")


def _first_true(mask: np.ndarray) -> int | None:
    """Index of the first True, found without a Python loop (``argmax`` stops at the first hit)."""
    return int(np.argmax(mask)) if mask.any() else None


def _as_text(values: pd.Series) -> pd.Series:
    """Stripped text in an ``object`` column (missing stays NaN); cheap when already object."""
    if values.dtype != object:
        values = values.astype(object).where(values.notna(), np.nan)
    return values.str.strip()


def _to_ids(values: pd.Series, fail: Fail, strip: bool = True) -> np.ndarray:
    """Ids as stripped Python ``str``; empty/NaN-like values are errors, not silent ``"nan"`` ids.

    Object text straight from the C parser is used as is when the file holds no padding (the scan
    knows), so the common case costs one hash lookup per value; otherwise trimming runs in Arrow
    kernels (pandas' ``.str`` methods call a Python function per value).
    """
    if values.dtype == object and not strip:
        text = values
    else:
        text = pd.Series(_trimmed_strings(values), index=values.index, dtype=object)
    bad = text.isin(_MISSING_ID_VALUES).to_numpy(dtype=bool)  # one hash pass; also matches None/NaN
    row = _first_true(bad)
    if row is not None:
        raise fail(row, f"empty or missing id ({_shown(values, row)!r}); every row needs an id: fill or drop this row")
    return text.to_numpy(dtype=object)


def _trimmed_strings(values: pd.Series) -> np.ndarray:
    """Whitespace-trimmed text as an object array (missing stays None), via Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.dtype == object:
        strings = pa.array(values.to_numpy(), type=pa.string(), from_pandas=True)
    else:
        strings = pc.cast(pa.array(values, from_pandas=True), pa.string())
    return pc.utf8_trim_whitespace(strings).to_numpy(zero_copy_only=False)


def _to_floats(values: pd.Series, fail: Fail, *, what: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(values.dtype) or not pd.api.types.is_numeric_dtype(values.dtype):
        numbers = pd.to_numeric(_as_text(values), errors="coerce")
    else:
        numbers = values
    result = np.asarray(numbers, dtype=np.float64)
    row = _first_true(~np.isfinite(result))
    if row is not None:
        raise fail(row, f"value {_shown(values, row)!r} is not {what}")
    return result


def _shown(values: pd.Series, row: int) -> Any:
    value = values.iat[row]
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _to_seconds(values: pd.Series, fail: Fail, timestamp_format: str | None) -> np.ndarray:
    """Timestamps as float seconds since the epoch, from numbers or (with a format) datetimes."""
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values.dtype):
        return _datetimes_to_seconds(values, values, fail, "a valid datetime")
    fmt = (timestamp_format or "s").strip()
    if fmt.lower() in _NUMERIC_TIME_FORMATS:
        hint = (" (for dates, set data.source.timestamp_format: iso or a strftime format such as %Y-%m-%d %H:%M:%S;"
                " config key data.source.timestamp_format)")
        seconds = _to_floats(values, fail, what="a numeric timestamp" + hint)
        return seconds / 1000.0 if fmt.lower() in ("ms", "milliseconds") else seconds
    text = _as_text(values)
    if fmt.lower() in ("iso", "iso8601", "iso-8601"):
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        return _datetimes_to_seconds(parsed, values, fail, "an ISO-8601 datetime (data.source.timestamp_format: iso)")
    parsed = pd.to_datetime(text, format=fmt, utc=True, errors="coerce")
    return _datetimes_to_seconds(parsed, values, fail, f"a datetime in the format {fmt!r} (data.source.timestamp_format)")


def _datetimes_to_seconds(parsed: pd.Series, original: pd.Series, fail: Fail, what: str) -> np.ndarray:
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC")
    else:
        parsed = parsed.dt.tz_localize("UTC")
    seconds = ((parsed - _EPOCH) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64, na_value=np.nan)
    row = _first_true(np.isnan(seconds))
    if row is not None:
        raise fail(row, f"timestamp {_shown(original, row)!r} is not {what}")
    return seconds


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def _read_parquet(p: Path, spec: _TableSpec) -> pd.DataFrame:
    """Read only the declared columns, batch by batch, into arrays allocated once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err}); check data.source.format and the file",
                        path=str(p), key="data.source.format") from None
    names = list(parquet.schema_arrow.names)
    if any(isinstance(ref, int) for ref in spec.columns.values()):
        raise DataError("Parquet columns have names; map columns by name, not position", path=str(p),
                        key=spec.key_prefix)
    _check_header(p, names, spec, None)
    n_rows = parquet.metadata.num_rows
    if n_rows == 0:
        raise DataError("the Parquet file has no rows", path=str(p))
    wanted = list(dict.fromkeys(str(ref) for ref in spec.columns.values()))
    out = {name: np.empty(n_rows, dtype=object if spec.kinds[name] in ("id", "text") else np.float64)
           for name in spec.columns}
    offset = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
        for name, ref in spec.columns.items():
            column, kind = batch.column(batch.schema.get_field_index(str(ref))), spec.kinds[name]
            fail = _row_locator(p, spec, name, offset)
            if kind == "id":
                converted = _arrow_ids(column, fail)
            else:
                converted = _convert(_arrow_to_series(column), kind, fail, spec.timestamp_format)
            out[name][offset:offset + batch.num_rows] = converted
        offset += batch.num_rows
    table = _frame(out)
    if spec.unique_id is not None:
        duplicated = table[spec.unique_id].duplicated().to_numpy()
        row = _first_true(duplicated)
        if row is not None:
            raise _row_locator(p, spec, spec.unique_id, 0)(row, f"id {table[spec.unique_id].iat[row]!r} appears twice")
    return table


def _row_locator(p: Path, spec: _TableSpec, name: str, offset: int) -> Fail:
    """Parquet has no lines: errors name the 1-based row instead."""
    def fail(row: int, message: str) -> DataError:
        return DataError(f"row {offset + row + 1}: {message}", path=str(p), column=spec.label(name))
    return fail


def _arrow_to_series(column: Any) -> pd.Series:
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.to_pandas(date_as_object=False)


def _arrow_ids(column: Any, fail: Fail) -> np.ndarray:
    """An Arrow id column as trimmed Python str, all in Arrow kernels; ``12`` / ``12.0`` -> ``"12"``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_floating(column.type):
        finite = pc.fill_null(pc.is_finite(column), True)
        integral = pc.fill_null(pc.equal(pc.floor(column), column), True)
        if pc.all(pc.and_(finite, integral)).as_py():
            column = pc.cast(column, pa.int64())
    try:
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise fail(0, f"cannot use a column of type {column.type} as ids; store ids as strings or integers") from None
    bad = pc.or_(pc.is_null(text), pc.is_in(text, value_set=pa.array(MISSING_ID_STRINGS)))
    if pc.any(bad).as_py():
        row = _first_true(bad.to_numpy(zero_copy_only=False))
        shown = column[row].as_py()
        raise fail(row, f"empty or missing id ({'' if shown is None else shown!r}); every row needs an id: "
                        "fill or drop this row")
    return text.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------------
# canonical shape
# --------------------------------------------------------------------------------------------


def _frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Columns as given: object arrays stay ``object`` (pandas 3 would otherwise infer ``str``)."""
    return pd.DataFrame({name: pd.Series(values, dtype=values.dtype, copy=False) for name, values in columns.items()})


def _canonical_interactions(table: pd.DataFrame) -> pd.DataFrame:
    """Order the columns as the schema lists them; a session log's session doubles as its user."""
    if USER not in table:
        table[USER] = table[SESSION]
    order = [c for c in (USER, ITEM, TIMESTAMP, RATING, SESSION) if c in table]
    return table[order].reset_index(drop=True)
