"""Where the pipeline's output arrays go: memory, or ``.npy`` files written by appending.

The engine streams each split's rows in order, so every array is filled front to back. Files are
written with plain appends (header first, length known from a count), not through a writable
memory map: dirty mapped pages would count against the process's resident memory, appended bytes
go through the page cache and do not. The finished files are opened memory-mapped (copy-on-write).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rectrain.utils.arrays import unique_ints


class MemorySink:
    """Arrays in memory (small logs, tests, a cache that cannot be written)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = {}

    def open(self, name: str, dtype: Any, length: int) -> None:
        self._arrays[name], self._filled[name] = np.empty(length, dtype=dtype), 0

    def append(self, name: str, values: np.ndarray) -> None:
        start = self._filled[name]
        self._arrays[name][start:start + values.shape[0]] = values
        self._filled[name] = start + values.shape[0]

    def finish(self) -> dict[str, np.ndarray]:
        short = {n: (f, self._arrays[n].shape[0]) for n, f in self._filled.items() if f != self._arrays[n].shape[0]}
        if short:
            raise RuntimeError(f"arrays not filled to their counted length: {short}")
        return self._arrays


class NpyFileSink:
    """One ``<name>.npy`` per array in ``directory``, appended to; memory-mapped once finished."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, tuple[BinaryIO, np.dtype, int]] = {}
        self._filled: dict[str, int] = {}

    def open(self, name: str, dtype: Any, length: int) -> None:
        dtype = np.dtype(dtype)
        handle = open(self.directory / f"{name}.npy", "wb")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_1_0(handle, header)
        self._files[name], self._filled[name] = (handle, dtype, length), 0

    def append(self, name: str, values: np.ndarray) -> None:
        handle, dtype, _ = self._files[name]
        handle.write(memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B"))  # no bytes copy
        self._filled[name] += values.shape[0]

    def finish(self) -> dict[str, np.ndarray]:
        for handle, _, _ in self._files.values():
            handle.close()
        short = {n: (f, self._files[n][2]) for n, f in self._filled.items() if f != self._files[n][2]}
        if short:
            raise RuntimeError(f"arrays not filled to their counted length: {short}")
        return {name: np.load(self.directory / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                for name in self._files}

    def close(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()


class DistinctUsersPerItem:
    """Per item, how many distinct users have it, from (user, item) rows streamed in user order.

    Item popularity (what evaluation's popularity metrics and the popularity baseline use) counted
    while the pipeline writes the arrays: a user's rows are complete once a later user appears, so
    each call counts the users it has finished and carries the last one over. Memory: one batch
    plus one user's rows; nothing is read back from disk (at 1B events, counting afterwards took
    26 minutes of reading the memory-mapped splits).
    """

    def __init__(self, n_items: int, pairs_distinct: bool = False) -> None:
        self.n_items = int(n_items)
        #: no (user, item) pair repeats (a deduplicated log): each row is one user of its item
        self.pairs_distinct = bool(pairs_distinct)
        self.counts = np.zeros(self.n_items, dtype=np.int64)
        self._user = np.zeros(0, dtype=np.int64)
        self._item = np.zeros(0, dtype=np.int64)

    def add(self, user: np.ndarray, item: np.ndarray) -> None:
        """Rows sorted by user, continuing the rows of the previous call."""
        if self.pairs_distinct:
            self.counts += np.bincount(item, minlength=self.n_items)
            return
        user = np.concatenate([self._user, user]) if self._user.size else np.asarray(user, dtype=np.int64)
        item = np.concatenate([self._item, item]) if self._item.size else np.asarray(item, dtype=np.int64)
        if not user.size:
            return
        last = int(np.searchsorted(user, user[-1]))  # the last user's rows may go on in the next call
        self._count(user[:last], item[:last])
        self._user, self._item = user[last:].copy(), item[last:].copy()

    def finish(self) -> np.ndarray:
        self._count(self._user, self._item)
        self._user, self._item = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.counts

    def _count(self, user: np.ndarray, item: np.ndarray) -> None:
        if user.size:
            pairs = unique_ints(user.astype(np.int64) * self.n_items + item)
            self.counts += np.bincount(pairs % self.n_items, minlength=self.n_items)
