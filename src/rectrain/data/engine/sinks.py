"""Where the pipeline's output arrays go: memory, or ``.npy`` files written by appending.

The engine streams each split's rows in order, so every array is filled front to back. Files are
written with plain appends (header first, length known from a count), not through a writable
memory map: dirty mapped pages would count against the process's resident memory, appended bytes
go through the page cache and do not. The finished files are opened memory-mapped (copy-on-write).
The writes and their checksums run on a thread of their own, so the disk's pace (the kernel
throttles a writer once gigabytes are dirty) overlaps the work that produces the next rows.

An array opened with ``exact=False`` has only an upper bound (training without its cold items,
which the stream drops as it goes): it ends at the rows it received, and a file's header is
rewritten in place with that length.
"""
from __future__ import annotations

import collections
import io
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rectrain.data import cache
from rectrain.utils.arrays import unique_ints


def _check_room(name: str, filled: int, rows: int, length: int) -> None:
    if filled + rows > length:
        raise RuntimeError(f"array {name!r} got more rows than counted: {filled + rows} > {length}")


def _check_filled(filled: dict[str, int], lengths: dict[str, int], exact: dict[str, bool]) -> None:
    """Every array opened as exact holds its counted rows."""
    short = {n: (f, lengths[n]) for n, f in filled.items() if exact[n] and f != lengths[n]}
    if short:
        raise RuntimeError(f"arrays not filled to their counted length: {short}")


class MemorySink:
    """Arrays in memory (small logs, tests, a cache that cannot be written)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = {}
        self._exact: dict[str, bool] = {}

    def open(self, name: str, dtype: Any, length: int, exact: bool = True) -> None:
        """An array of ``length`` rows (``exact=False``: at most that many)."""
        self._arrays[name], self._filled[name], self._exact[name] = np.empty(length, dtype=dtype), 0, exact

    def append(self, name: str, values: np.ndarray) -> None:
        start = self._filled[name]
        _check_room(name, start, values.shape[0], self._arrays[name].shape[0])
        self._arrays[name][start:start + values.shape[0]] = values
        self._filled[name] = start + values.shape[0]

    def finish(self) -> dict[str, np.ndarray]:
        _check_filled(self._filled, {n: a.shape[0] for n, a in self._arrays.items()}, self._exact)
        return {name: array[:self._filled[name]] for name, array in self._arrays.items()}


#: appends queued to the writer thread before ``append`` waits for the oldest: the memory of the
#: rows in flight (a few batches of the sorted stream, ~2 MB an array each)
WRITES_IN_FLIGHT = 32


class NpyFileSink:
    """One ``<name>.npy`` per array in ``directory``, appended to; memory-mapped once finished.

    Appends are written (and hashed: both release the GIL) by one thread in the order they came,
    up to WRITES_IN_FLIGHT behind the caller; a write's error (a full disk) is raised by the next
    ``append`` or by ``finish``. The rows given to ``append`` must not be changed afterwards.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, tuple[BinaryIO, np.dtype, int]] = {}
        self._filled: dict[str, int] = {}
        self._exact: dict[str, bool] = {}
        self._hashers: dict[str, cache.ShardHasher] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rectrain-npy-writer")
        self._in_flight: collections.deque[Future] = collections.deque()

    def open(self, name: str, dtype: Any, length: int, exact: bool = True) -> None:
        """``<name>.npy`` of ``length`` rows (``exact=False``: at most that many)."""
        dtype = np.dtype(dtype)
        handle = open(self.directory / f"{name}.npy", "wb")
        handle.write(_npy_header(dtype, length))
        self._files[name], self._filled[name], self._exact[name] = (handle, dtype, length), 0, exact
        if length > cache.SHARD_ROWS:  # checksummed per shard: hashed here, as the bytes go out
            self._hashers[name] = cache.ShardHasher(dtype.itemsize)

    def append(self, name: str, values: np.ndarray) -> None:
        handle, dtype, length = self._files[name]
        _check_room(name, self._filled[name], values.shape[0], length)
        data = memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")  # no bytes copy
        while self._in_flight and (len(self._in_flight) >= WRITES_IN_FLIGHT or self._in_flight[0].done()):
            self._in_flight.popleft().result()  # a failed write raises here, in the caller's thread
        self._in_flight.append(self._writer.submit(self._write, handle, self._hashers.get(name), data))
        self._filled[name] += values.shape[0]

    @staticmethod
    def _write(handle: BinaryIO, hasher: cache.ShardHasher | None, data: memoryview) -> None:
        handle.write(data)
        if hasher is not None:
            hasher.update(data)

    def _drain(self) -> None:
        """Wait for every queued write; the first error raised."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def finish(self) -> dict[str, np.ndarray]:
        self._drain()
        _check_filled(self._filled, {n: f[2] for n, f in self._files.items()}, self._exact)
        for name, (handle, dtype, length) in self._files.items():
            if self._filled[name] != length:  # an upper bound: the header says the rows it got
                handle.seek(0)
                handle.write(_npy_header(dtype, self._filled[name], size=len(_npy_header(dtype, length))))
            handle.close()
            if name in self._hashers:
                self._hashers[name].finish(self.directory / f"{name}.npy")
        return {name: np.load(self.directory / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                for name in self._files}

    def close(self) -> None:
        """Stop the writer (its queued writes done or failed) and close every file; after an error
        too, so nothing writes into a directory being removed."""
        for pending in self._in_flight:
            pending.cancel()
        self._writer.shutdown(wait=True)
        self._in_flight.clear()
        for handle, _, _ in self._files.values():
            handle.close()


def _npy_header(dtype: np.dtype, length: int, size: int | None = None) -> bytes:
    """The ``.npy`` (1.0) header of a 1-d array; ``size``: padded with spaces to that many bytes, so
    a shorter length can replace a header already written in front of the data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                              "fortran_order": False, "shape": (int(length),)})
    header = out.getvalue()
    if size is None or size == len(header):
        return header
    text = header[10:].rstrip(b" \n")  # magic (6), version (2), length (2), then the dict
    if len(text) + 11 > size:
        raise ValueError(f"a header of {len(text) + 11} bytes does not fit in {size}")
    return header[:8] + struct.pack("<H", size - 10) + text + b" " * (size - 11 - len(text)) + b"\n"


class DistinctUsersPerItem:
    """Per item, how many distinct users have it, from (user, item) rows of whole users.

    Item popularity (what evaluation's popularity metrics and the popularity baseline use) counted
    while the pipeline writes the arrays, whose batches hold whole users (``whole_users``): a
    user's distinct items are counted within the call that holds all of them. Nothing is read back
    from disk (at 1B events, counting afterwards took 26 minutes of reading the memory-mapped splits).
    """

    def __init__(self, n_items: int, pairs_distinct: bool = False) -> None:
        self.n_items = int(n_items)
        #: no (user, item) pair repeats (a deduplicated log): each row is one user of its item
        self.pairs_distinct = bool(pairs_distinct)
        self.counts = np.zeros(self.n_items, dtype=np.int64)
        self._pending: list[np.ndarray] = []  # items of distinct (user, item) pairs not yet counted
        self._pending_rows = 0

    def add(self, user: np.ndarray, item: np.ndarray) -> None:
        """The rows of some users, all of each user's rows in this one call."""
        if self.pairs_distinct:
            distinct_items = np.asarray(item)
        elif user.size:
            distinct_items = unique_ints(user.astype(np.int64) * self.n_items + item) % self.n_items
        else:
            return
        self._pending.append(distinct_items)
        self._pending_rows += distinct_items.size
        if self._pending_rows >= self.n_items:  # a bincount costs n_items, so it waits for as many rows
            self._count_pending()

    def _count_pending(self) -> None:
        """One bincount of the rows held: per batch, a 1M-item catalog made it 1,524 passes over a
        1M-row array at 100M events (2.7 s), growing with events x items instead of events."""
        if self._pending:
            self.counts += np.bincount(np.concatenate(self._pending), minlength=self.n_items)
        self._pending, self._pending_rows = [], 0

    def finish(self) -> np.ndarray:
        self._count_pending()
        return self.counts
