"""A prepared-data cache directory that verifies itself: a manifest written with it, checked on load.

The manifest (``manifest.json``, written last) records, for every file of the cache, its byte size
and sha256, and for every ``.npy`` its shape, dtype and memory order; an array longer than
SHARD_ROWS rows is checksummed per shard of rows (rows and sha256 of each), so damage is named by
the rows it hit. Checks come in two weights:

* **cheap, on every load**: each file exists with its recorded size; each ``.npy`` header matches
  the recorded shape/dtype and header + data fill the file exactly; ``meta.json`` (tiny) is hashed.
  A stat and a few hundred header bytes per array: memory-mapping stays cheap.
* **full (sha256 of every byte)**: the first time any process loads a build, and whenever the
  caller asks (``data.verify_cache=true``). Success is recorded in ``verified.json`` (written
  atomically) holding the sha256 of the manifest; the manifest carries a random build id, so a
  marker vouches only for the build it checked, never for a later rebuild at the same path.

A damaged cache is moved aside and deleted by :func:`discard_if_unchanged` under a per-cache lock,
and only when the directory is still the one that failed: a process that found damage never removes
a cache another process has just rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rectrain.utils.io import file_sha256, remove_stale_temporaries, temp_prefix, write_json_atomic

MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = "verified.json"


class CacheUnwritable(Exception):
    """The cache directory cannot be locked, discarded or written (e.g. a read-only shared cache)."""


class CacheDamaged(Exception):
    """A cache directory failed a check; ``reason`` names the file and what failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- writing ------------------------------------------------------------------------------------
def write_manifest(directory: Path, format_version: int) -> None:
    """Record size, checksum (and array shape/dtype) of every file now in ``directory``.

    Called after everything else is written; the manifest is the last file of a complete cache.
    """
    paths = [p for p in sorted(directory.iterdir()) if p.name not in (MANIFEST_NAME, VERIFIED_NAME) and p.is_file()]
    files = dict(zip((p.name for p in paths), _in_threads(_manifest_entry, paths)))
    manifest = {"format": format_version, "build": uuid.uuid4().hex, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _manifest_entry(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"bytes": path.stat().st_size}
    if path.suffix == ".npy":
        shape, fortran, dtype, _ = _npy_header(path)
        entry.update(shape=list(shape), dtype=dtype.str, fortran_order=fortran)
        if shape and shape[0] > SHARD_ROWS:
            entry["shards"] = _digests_as_written(path, shape[0]) or _shard_digests(path)
    entry["sha256"] = _shards_root(path, entry["shards"]) if "shards" in entry else file_sha256(path)
    return entry


def _in_threads(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a few threads (one per core, at most 4: a disk serves only so
    many readers): sha256 releases the GIL, and a cache of a billion events is 24 GB to hash (1.6
    GB/s on one core here). The first exception in the order of ``items`` is raised, as the loop
    would, and the work not yet started is cancelled."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1, 4)))
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: rows per checksummed shard of a large array: the manifest records each shard's rows and sha256, so
#: damage is named by its rows (the training stream reads a split shard by shard)
SHARD_ROWS = 1 << 23


def _shard_digests(path: Path) -> list[dict[str, Any]]:
    """``[{"rows": [lo, hi], "sha256": ...}]`` over the array's data in shards of SHARD_ROWS rows."""
    shape, _, dtype, offset = _npy_header(path)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    shards = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for lo in range(0, shape[0], SHARD_ROWS):
            hi = min(shape[0], lo + SHARD_ROWS)
            digest, left = hashlib.sha256(), (hi - lo) * row_bytes
            while left > 0:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
            shards.append({"rows": [lo, hi], "sha256": digest.hexdigest()})
    return shards


class ShardHasher:
    """The shard digests of a 1-d array's data, fed by its writer as the bytes go out: the manifest
    then needs no second read of them (a billion events: 23.5 GB read back from the disk, ~21 s)."""

    def __init__(self, row_bytes: int) -> None:
        self.row_bytes = int(row_bytes)
        self._shards: list[dict[str, Any]] = []
        self._digest, self._rows, self._lo = hashlib.sha256(), 0, 0

    def update(self, data: memoryview) -> None:
        """The next whole rows of the array, as bytes."""
        data = data.cast("B")
        while len(data):
            take = min(len(data), (SHARD_ROWS - (self._rows - self._lo)) * self.row_bytes)
            self._digest.update(data[:take])
            self._rows += take // self.row_bytes
            data = data[take:]
            if self._rows - self._lo == SHARD_ROWS:
                self._close_shard()

    def _close_shard(self) -> None:
        self._shards.append({"rows": [self._lo, self._rows], "sha256": self._digest.hexdigest()})
        self._digest, self._lo = hashlib.sha256(), self._rows

    def finish(self, path: Path) -> None:
        """Record the digests for ``path``, now written and closed, for :func:`write_manifest`."""
        if self._rows > self._lo:
            self._close_shard()
        stat = path.stat()
        _WRITTEN[str(path.resolve())] = (stat.st_size, stat.st_mtime_ns, self._rows, self._shards)


#: path -> (size, mtime_ns, rows, shard digests) recorded by a ShardHasher in this process
_WRITTEN: dict[str, tuple[int, int, int, list[dict[str, Any]]]] = {}


def _digests_as_written(path: Path, rows: int) -> list[dict[str, Any]] | None:
    """The writer's digests of ``path`` if the file is still exactly as it left it (size, mtime and
    rows), else None: the manifest then reads the file."""
    recorded = _WRITTEN.pop(str(path.resolve()), None)
    if recorded is None:
        return None
    size, mtime_ns, written_rows, shards = recorded
    stat = path.stat()
    return shards if (stat.st_size, stat.st_mtime_ns, written_rows) == (size, mtime_ns, rows) else None


def _shards_root(path: Path, shards: list[dict[str, Any]]) -> str:
    """A sharded array's file checksum: its header bytes and its shards' digests, hashed together."""
    _, _, _, offset = _npy_header(path)
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read(offset))
    for shard in shards:
        digest.update(f"{shard['rows'][0]}:{shard['rows'][1]}:{shard['sha256']}".encode())
    return digest.hexdigest()


# --- checking -----------------------------------------------------------------------------------
def verify(directory: Path, format_version: int, full: bool = False) -> set[str]:
    """Raise :class:`CacheDamaged` unless ``directory`` is an intact cache of ``format_version``.

    The cheap checks always run; checksums run when ``full`` or when this build was never verified.
    Returns the names of the files checked: a reader must use no other.
    """
    manifest_bytes, manifest = _read_manifest(directory, format_version)
    for name, entry in manifest["files"].items():
        _check_file(directory / name, entry)
    digest = _sha256_bytes(manifest_bytes)
    if full or not _marked_verified(directory, digest):
        checks = [(directory / name, entry) for name, entry in manifest["files"].items()
                  if name != "meta.json"]  # hashed by the cheap check already
        _in_threads(lambda check: _check_checksum(*check), checks)
        _mark_verified(directory, digest)
    return set(manifest["files"])


def _read_manifest(directory: Path, format_version: int) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and content; a missing, unparsable or old-format one is damage."""
    try:
        raw = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise CacheDamaged(f"{MANIFEST_NAME}: missing (an old-format or incomplete cache)") from None
    except OSError as exc:
        raise CacheDamaged(f"{MANIFEST_NAME}: unreadable ({exc.strerror})") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        fmt = manifest["format"]
        ok = isinstance(files, dict) and "meta.json" in files and all(_entry_ok(n, e) for n, e in files.items())
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise CacheDamaged(f"{MANIFEST_NAME}: not a valid manifest")
    if fmt != format_version:
        raise CacheDamaged(f"{MANIFEST_NAME}: format {fmt!r}, expected {format_version}")
    return raw, manifest


def _entry_ok(name: str, entry: Any) -> bool:
    """A manifest entry names a file of this directory and holds every field the checks read."""
    if not isinstance(entry, dict) or Path(name).name != name:
        return False
    ok = isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
    if name.endswith(".npy"):
        ok = ok and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str) \
            and isinstance(entry.get("fortran_order"), bool)
        shards = entry.get("shards", [])
        ok = ok and isinstance(shards, list) and all(
            isinstance(s, dict) and isinstance(s.get("sha256"), str) and isinstance(s.get("rows"), list)
            and len(s["rows"]) == 2 and all(isinstance(r, int) for r in s["rows"]) for s in shards)
    return ok


def _check_file(path: Path, entry: dict[str, Any]) -> None:
    """Cheap check of one file: present with its recorded size; ``.npy`` header as recorded."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheDamaged(f"{path.name}: missing") from None
    except OSError as exc:
        raise CacheDamaged(f"{path.name}: unreadable ({exc.strerror})") from None
    if size != entry["bytes"]:
        raise CacheDamaged(f"{path.name}: {size} bytes, expected {entry['bytes']}")
    if path.suffix == ".npy":
        _check_npy_header(path, entry, size)
    elif path.name == "meta.json":
        _check_checksum(path, entry)


def _check_npy_header(path: Path, entry: dict[str, Any], size: int) -> None:
    """The array header must describe the recorded array, and header + data must fill the file."""
    try:
        shape, fortran, dtype, offset = _npy_header(path)
    except Exception as exc:  # numpy's header parser raises many kinds on garbage (ValueError, TokenError, ...)
        raise CacheDamaged(f"{path.name}: unreadable .npy header ({type(exc).__name__})") from None
    if list(shape) != list(entry["shape"]):
        raise CacheDamaged(f"{path.name}: shape {tuple(shape)}, expected {tuple(entry['shape'])}")
    if dtype.str != entry["dtype"] or fortran != entry["fortran_order"]:
        raise CacheDamaged(f"{path.name}: dtype {dtype.str}, expected {entry['dtype']}")
    if dtype.hasobject:
        raise CacheDamaged(f"{path.name}: holds Python objects")
    if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != size:
        raise CacheDamaged(f"{path.name}: header and file size disagree")


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from a ``.npy`` header, without reading the data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, fortran, dtype, fh.tell()


def _check_checksum(path: Path, entry: dict[str, Any]) -> None:
    """Full check of one file: its sha256 (a sharded array: every shard's) must be the recorded one."""
    try:
        if "shards" in entry:
            actual = _shard_digests(path)
            for index, (got, want) in enumerate(zip(actual, entry["shards"])):
                if got != want:
                    lo, hi = want["rows"]
                    raise CacheDamaged(f"{path.name}: sha256 mismatch in rows {lo:,}..{hi - 1:,} "
                                       f"(shard {index + 1} of {len(entry['shards'])})")
            if len(actual) != len(entry["shards"]) or _shards_root(path, actual) != entry["sha256"]:
                raise CacheDamaged(f"{path.name}: sha256 mismatch (shards or header)")
            return
        actual = file_sha256(path)
    except OSError as exc:
        raise CacheDamaged(f"{path.name}: unreadable ({exc.strerror})") from None
    if actual != entry["sha256"]:
        raise CacheDamaged(f"{path.name}: sha256 mismatch")


def _sha256_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _marked_verified(directory: Path, manifest_digest: str) -> bool:
    """True when ``verified.json`` vouches for exactly this manifest (this build)."""
    try:
        marker = json.loads((directory / VERIFIED_NAME).read_text())
        return isinstance(marker, dict) and marker.get("manifest_sha256") == manifest_digest
    except (OSError, ValueError):
        return False


def _mark_verified(directory: Path, manifest_digest: str) -> None:
    """Record a successful full check; on a read-only cache the check simply repeats next time."""
    try:
        remove_stale_temporaries(directory)  # a marker write killed midway left its temporary here
        write_json_atomic(directory / VERIFIED_NAME, {"manifest_sha256": manifest_digest})
    except OSError:
        pass


# --- healing ------------------------------------------------------------------------------------
def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory, or None when absent: tells one build at ``path`` from the next."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold the per-cache lock (``.<key>.lock`` beside it) that serialises discarding and rebuilding.

    Only processes that found damage take it; ordinary loads never wait. Raises
    :class:`CacheUnwritable` when the lock file cannot be opened (a read-only cache dir).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(target.parent / f".{target.name}.lock", "a")
    except OSError as exc:  # a read-only cache dir: nothing here can be discarded or rebuilt
        raise CacheUnwritable(exc.strerror or str(exc)) from None
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def discard_if_unchanged(target: Path, failed: tuple[int, int] | None) -> bool:
    """Remove ``target`` if it is still the directory that failed (``failed`` = its identity).

    Call under :func:`exclusive`. Returns False when ``target`` was replaced meanwhile (another
    process rebuilt it: check the new one instead); raises :class:`CacheUnwritable` when it cannot
    be moved (a read-only cache dir). The directory is first renamed to a temporary
    name, so a kill while deleting leaves debris :func:`remove_stale_temporaries` recognises.
    """
    current = identity(target)
    if current is None:
        return True  # already discarded by another process: rebuild
    if current != failed:
        return False  # replaced by another process's rebuild: check that one instead
    aside = target.parent / f"{temp_prefix(target.name)}damaged-{secrets.token_hex(4)}.tmp"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return True
    except OSError as exc:  # e.g. EROFS, EACCES: the damaged cache stays where it is
        raise CacheUnwritable(exc.strerror or str(exc)) from None
    if identity(aside) != failed:  # an empty damaged dir was replaced between stat and rename: undo
        try:
            os.rename(aside, target)
        except OSError:
            shutil.rmtree(aside, ignore_errors=True)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True
