"""The prepared-data cache verifies itself and heals: any damage is found (cheaply on every load,
by checksum on a build's first load or with verify_cache), warned about once, discarded and rebuilt;
a killed writer leaves nothing a later run trusts."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from rectrain.data.dataset import PreparedData, SplitConfig, load_or_prepare
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.sources import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"n_users": 60, "n_items": 40, "n_categories": 5, "mean_length": 12, "seed": 3}
PRE, SPLIT = PreprocessConfig(min_user_interactions=2, min_item_interactions=2), SplitConfig()


def _load(cache_dir: Path, verify: bool = False) -> PreparedData:
    if verify:
        return load_or_prepare(SyntheticSource(**PARAMS), PRE, SPLIT, cache_dir, verify=True)
    return load_or_prepare(SyntheticSource(**PARAMS), PRE, SPLIT, cache_dir)


def _arrays(data: PreparedData) -> dict[str, np.ndarray]:
    out = {f"{part}_{col}": np.asarray(getattr(getattr(data, part), col))
           for part in ("train", "valid", "test") for col in ("user", "item", "timestamp")}
    for name in ("user_vocab", "item_vocab", "item_titles", "category_vocab", "item_category_indptr",
                 "item_category_index", "cold_items"):
        out[name] = np.asarray(getattr(data, name))
    out.update({f"attr_{k}": np.asarray(v) for k, v in data.user_attributes.items()})
    return out


def _assert_same(data: PreparedData, expected: PreparedData) -> None:
    got, want = _arrays(data), _arrays(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name], equal_nan=want[name].dtype.kind == "f"), name


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def fresh() -> PreparedData:
    """The dataset as a fresh prepare (no cache) builds it."""
    return load_or_prepare(SyntheticSource(**PARAMS), PRE, SPLIT, None)


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, Path]:
    """(cache dir, the one cache directory in it), freshly written and not yet loaded."""
    cache_dir = tmp_path / "cache"
    _load(cache_dir)
    (target,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    return cache_dir, target


def _truncate(target: Path) -> None:
    path = target / "train_item.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(target: Path) -> None:
    (target / "valid_user.npy").write_bytes(b"")


def _garble(target: Path) -> None:
    path = target / "train_item.npy"  # same size, header intact: only the checksum can tell
    blob = bytearray(path.read_bytes())
    blob[-16:] = bytes(b ^ 0x5A for b in blob[-16:])
    path.write_bytes(bytes(blob))


def _delete_array(target: Path) -> None:
    (target / "test_timestamp.npy").unlink()


def _delete_meta(target: Path) -> None:
    (target / "meta.json").unlink()


def _break_meta(target: Path) -> None:
    (target / "meta.json").write_text('{"split": "leave_one_out", ')


def _break_manifest(target: Path) -> None:
    (target / "manifest.json").write_text("not a manifest")


def _manifest_drops_an_array(target: Path) -> None:
    """A valid manifest that no longer covers every array meta.json lists."""
    path = target / "manifest.json"
    manifest = json.loads(path.read_text() if path.exists() else '{"files": {}}')
    manifest["files"].pop("user_vocab.npy", None)
    path.write_text(json.dumps(manifest))


def _old_format(target: Path) -> None:
    """The layout of format 4: arrays and meta.json, no manifest."""
    (target / "manifest.json").unlink(missing_ok=True)
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "format": 4}))


def _break_vocabulary(target: Path) -> None:
    vocab = np.load(target / "item_vocab.npy")
    np.save(target / "item_vocab.npy", vocab[:-1])


def _shuffle_in_range(target: Path) -> None:
    path = target / "train_item.npy"  # every value still a valid item index: trains silently if trusted
    items = np.load(path)
    np.save(path, np.roll(items, 7))


# (damage, the file the warning names, loads before damage, verify_cache on the damaged load)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, int, bool]] = {
    "truncate_npy": (_truncate, "train_item.npy", 1, False),
    "empty_npy": (_empty, "valid_user.npy", 1, False),
    "garble_in_range_first_load": (_garble, "train_item.npy: sha256 mismatch", 0, False),
    "delete_npy": (_delete_array, "test_timestamp.npy: missing", 1, False),
    "delete_meta": (_delete_meta, "meta.json: missing", 1, False),
    "break_meta": (_break_meta, "meta.json", 1, False),
    "break_manifest": (_break_manifest, "manifest.json", 1, False),
    "manifest_drops_an_array": (_manifest_drops_an_array, "user_vocab.npy: not in manifest.json", 1, False),
    "old_format_no_manifest": (_old_format, "manifest.json: missing", 0, False),
    "break_vocabulary": (_break_vocabulary, "item_vocab.npy", 1, False),
    "shuffle_in_range_verify_cache": (_shuffle_in_range, "train_item.npy: sha256 mismatch", 1, True),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_cache_is_rebuilt_with_one_warning(kind, cached, fresh, caplog):
    damage, named, loads_before, verify = DAMAGE[kind]
    cache_dir, target = cached
    for _ in range(loads_before):  # a verified cache, damaged later
        _load(cache_dir)
    damage(target)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rectrain"):
        data = _load(cache_dir, verify=verify)
    (warning,) = _warnings(caplog)
    assert str(target) in warning and named in warning and "rebuilding" in warning
    _assert_same(data, fresh)
    # the damaged copy is gone: only the rebuilt cache (and its lock file) is left, and it is intact
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([target.name, f".{target.name}.lock"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rectrain"):
        _assert_same(_load(cache_dir, verify=True), fresh)
    assert _warnings(caplog) == []


def test_a_verified_cache_is_not_rehashed_unless_asked(cached, fresh, monkeypatch):
    from rectrain.data import cache

    calls: list[str] = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: calls.append(Path(path).name) or real(path))
    cache_dir, target = cached
    _assert_same(_load(cache_dir), fresh)  # first load of this build: every array hashed
    assert "train_item.npy" in calls and "item_vocab.npy" in calls
    calls.clear()
    _assert_same(_load(cache_dir), fresh)
    assert calls == ["meta.json"]  # later loads: sizes and headers, only the tiny meta.json hashed
    calls.clear()
    _load(cache_dir, verify=True)
    assert "train_item.npy" in calls


def test_a_cache_another_process_rebuilt_is_not_discarded(cached, fresh, caplog, monkeypatch):
    """A process that found damage re-checks under the lock: a rebuild that won meanwhile stays."""
    from rectrain.data import cache

    cache_dir, target = cached
    _load(cache_dir)
    _truncate(target)
    real_exclusive = cache.exclusive
    rebuilt: list[tuple[int, int]] = []

    def other_process_rebuilds_first(path):
        if not rebuilt:  # before we get the lock, "another process" discards and rebuilds the cache
            os.rename(target, cache_dir / "elsewhere")
            _load(cache_dir)
            rebuilt.append(cache.identity(target))
        return real_exclusive(path)

    monkeypatch.setattr(cache, "exclusive", other_process_rebuilds_first)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rectrain"):
        data = _load(cache_dir)
    _assert_same(data, fresh)
    assert _warnings(caplog) == []
    assert cache.identity(target) == rebuilt[0]  # the other process's cache is the one in place


def test_data_verify_cache_from_the_config_checks_sums_once_per_datamodule(compose_cfg, tmp_path, caplog, monkeypatch):
    from rectrain.data import cache
    from rectrain.training import build
    from tests.conftest import TINY_DATA

    built = build(compose_cfg(*TINY_DATA).data)
    built.setup()  # writes the cache (the arrays it returns are mapped from it: copy them before damage)
    expected = {name: np.array(value) for name, value in _arrays(built.data).items()}
    build(compose_cfg(*TINY_DATA).data).setup()  # its first load: verified from now on
    (target,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    _shuffle_in_range(target)
    hashed: list[str] = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    datamodule = build(compose_cfg(*TINY_DATA, "data.verify_cache=true").data)
    assert datamodule.verify_cache is True
    with caplog.at_level(logging.INFO, logger="rectrain"):
        datamodule.prepare_data()  # as Lightning calls it: prepare_data, then setup
        datamodule.setup()
    (warning,) = _warnings(caplog)
    assert str(target) in warning and "train_item.npy: sha256 mismatch" in warning
    got = _arrays(datamodule.data)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert np.array_equal(got[name], want, equal_nan=want.dtype.kind == "f"), name
    hashed.clear()
    again = build(compose_cfg(*TINY_DATA, "data.verify_cache=true").data)
    again.prepare_data()
    again.setup()
    assert hashed.count("train_item.npy") == 1  # an intact, verified cache: summed in prepare_data, not again


# Prepares into the cache with every array write slowed down, so the parent reliably catches the
# writer while its temporary cache directory exists and SIGKILLs it there.
SLOW_WRITER = """
import sys, time
import numpy as np
real_save = np.save
def slow_save(*args, **kwargs):
    time.sleep(0.2)
    return real_save(*args, **kwargs)
np.save = slow_save
from rectrain.data.dataset import SplitConfig, load_or_prepare
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.sources import SyntheticSource
load_or_prepare(SyntheticSource(**{params!r}), PreprocessConfig(min_user_interactions=2, min_item_interactions=2),
                SplitConfig(), sys.argv[1])
"""


@pytest.mark.crash
def test_sigkill_while_preparing_leaves_no_trusted_cache(tmp_path, fresh, caplog):
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(params=PARAMS), str(cache_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    temporaries: list[Path] = []
    while not temporaries and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        temporaries = list(cache_dir.glob(".*.rectrain-tmp.*.tmp")) if cache_dir.is_dir() else []
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert temporaries, "the writer finished before its temporary directory was seen"
    assert [p for p in cache_dir.iterdir() if not p.name.startswith(".")] == []  # nothing a run would trust

    with caplog.at_level(logging.INFO, logger="rectrain"):
        _assert_same(_load(cache_dir), fresh)
    assert not any(p.exists() for p in temporaries)  # the dead writer's debris is gone
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []
    _assert_same(_load(cache_dir, verify=True), fresh)
    assert _warnings(caplog) == []


def _read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make every write under ``root`` fail with EROFS, as on a read-only mount (root ignores chmod)."""
    import builtins
    import errno
    import io

    def inside(path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root.resolve())
        except (TypeError, ValueError):
            return False

    def refuse(path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open = builtins.open

    def ro_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)
    for name in ("mkdir", "rmdir", "unlink", "remove"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, _real=real, **k: refuse(p) if inside(p) else _real(p, *a, **k))
    for name in ("rename", "replace"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda s, d, *a, _real=real, **k: refuse(s) if inside(s) or inside(d)
                            else _real(s, d, *a, **k))


def test_a_damaged_cache_in_a_read_only_dir_is_bypassed_with_one_warning(cached, fresh, caplog, monkeypatch):
    """It used to end the run with a traceback: OSError (read-only file system) opening the lock file."""
    cache_dir, target = cached
    _load(cache_dir)
    _truncate(target)
    damaged = sorted((p.name, p.stat().st_size) for p in target.iterdir())
    _read_only(monkeypatch, cache_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rectrain"):
        for _ in range(3):  # a run loads its data several times: one warning, not three
            _assert_same(_load(cache_dir), fresh)
    (warning,) = _warnings(caplog)
    assert str(target) in warning and "train_item.npy" in warning and "cannot be rebuilt" in warning
    assert sorted((p.name, p.stat().st_size) for p in target.iterdir()) == damaged  # left as it was


def test_no_cache_in_a_read_only_dir_prepares_without_one(tmp_path, fresh, caplog, monkeypatch):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    _read_only(monkeypatch, cache_dir)
    with caplog.at_level(logging.INFO, logger="rectrain"):
        _assert_same(_load(cache_dir), fresh)
    (warning,) = _warnings(caplog)
    assert "could not write the prepared-data cache" in warning and "going on without it" in warning
    assert list(cache_dir.iterdir()) == []


def test_large_arrays_are_checksummed_per_shard_and_damage_is_named_by_its_rows(tmp_path, fresh, caplog,
                                                                                monkeypatch):
    """Arrays longer than a shard carry rows and sha256 per shard in the manifest; a damaged shard is
    named by its rows, warned about once and the cache rebuilt."""
    from rectrain.data import cache

    monkeypatch.setattr(cache, "SHARD_ROWS", 64)
    cache_dir = tmp_path / "cache"
    _load(cache_dir)
    (target,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((target / "manifest.json").read_text())["files"]
    n_train = len(fresh.train)
    assert n_train > 3 * 64
    shards = manifest["train_item.npy"]["shards"]
    assert [s["rows"] for s in shards] == [[lo, min(lo + 64, n_train)] for lo in range(0, n_train, 64)]
    rows = np.load(target / "train_item.npy")
    import hashlib

    assert shards[1]["sha256"] == hashlib.sha256(rows[64:128].tobytes()).hexdigest()
    assert "shards" not in manifest["valid_item.npy"] or len(fresh.valid) > 64
    path = target / "train_item.npy"  # garble one value of the third shard, size and header intact
    offset = path.stat().st_size - rows.nbytes + 130 * rows.itemsize
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x5A
    path.write_bytes(bytes(blob))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rectrain"):
        data = _load(cache_dir)
    (warning,) = _warnings(caplog)
    assert "train_item.npy: sha256 mismatch in rows 128..191 (shard 3 of" in warning and "rebuilding" in warning
    _assert_same(data, fresh)


def test_the_manifest_takes_each_large_arrays_digests_from_its_writer(tmp_path, monkeypatch):
    """The split arrays are hashed per shard as they are written: the manifest reads none of them
    back (23.5 GB at a billion events), and its digests are those of the bytes on disk."""
    from rectrain.data import cache

    monkeypatch.setattr(cache, "SHARD_ROWS", 64)
    read_back: list[str] = []  # arrays whose digests the manifest computed by reading the file
    from_disk = cache._shard_digests
    monkeypatch.setattr(cache, "_shard_digests", lambda path: read_back.append(path.name) or from_disk(path))
    cache_dir = tmp_path / "cache"
    _load(cache_dir)
    (target,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    files = json.loads((target / "manifest.json").read_text())["files"]
    sharded = {name for name, entry in files.items() if "shards" in entry}
    assert {"train_user.npy", "train_item.npy", "train_timestamp.npy"} <= sharded
    assert not [name for name in read_back if name.startswith(("train_", "valid_", "test_"))], read_back
    for name in sharded:
        assert files[name]["shards"] == from_disk(target / name), name
