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
        handle.write(np.ascontiguousarray(values, dtype=dtype).tobytes())
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
