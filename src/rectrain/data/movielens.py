"""MovieLens in its original GroupLens formats, with optional verified download.

Three on-disk families exist and all end in the same :class:`RawLog`:

* ``ml-100k``: ``u.data`` (tab: user item rating ts), ``u.item`` (``|``, latin-1, 19 genre flags
  named by ``u.genre``), ``u.user`` (age, gender, occupation, zip);
* ``ml-1m`` / ``ml-10m``: ``ratings.dat`` and ``movies.dat`` separated by ``::`` (latin-1 in
  ml-1m), ``users.dat`` in ml-1m only;
* ``ml-20m``, ``ml-25m``, ``ml-32m``, ``ml-latest(-small)``: ``ratings.csv`` and ``movies.csv``.

Ratings go through :func:`rectrain.data.readers.read_table` (C parser, vectorised validation,
line numbers in errors); ``ratings.dat`` is read with ``:`` as separator, fields 0/2/4/6, which
keeps the C parser for the ``::`` format (ratings hold only numbers, so no value contains ``:``).
Item and user files are small and are read whole, decoded as UTF-8 with a latin-1 fallback
because GroupLens used both over the years.

The data's licence forbids redistribution, so nothing here ships data; with ``download=True`` the
official zip is fetched, checked against the ``.md5`` GroupLens publishes next to it (and, for
ml-100k, the pinned sha256 of ``u.data``), and moved into place only when complete.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rectrain.data.readers import read_table, split_categories
from rectrain.data.schema import ITEM, RATING, TIMESTAMP, USER, RawLog
from rectrain.errors import DataError
from rectrain.utils.io import remove_stale_temporaries, temp_prefix

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
#: sha256 of ml-100k's u.data (pinned independently of GroupLens' md5, see shared/data/README.md)
ML100K_UDATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
DOWNLOAD_TIMEOUT_S = 60.0
NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class Variant:
    """One MovieLens release: its files and the folder its zip unpacks to."""

    name: str
    folder: str  # top-level folder inside the official zip
    family: str  # "100k" | "dat" | "csv": which parser reads it
    ratings: str
    movies: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{BASE_URL}{self.name}.zip"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ml-100k", "ml-100k", "100k", "u.data", "u.item", ("u.data", "u.item", "u.genre"), ("u.user",)),
        Variant("ml-1m", "ml-1m", "dat", "ratings.dat", "movies.dat", ("ratings.dat", "movies.dat"), ("users.dat",)),
        Variant("ml-10m", "ml-10M100K", "dat", "ratings.dat", "movies.dat", ("ratings.dat", "movies.dat")),
        *(
            Variant(name, name, "csv", "ratings.csv", "movies.csv", ("ratings.csv", "movies.csv"))
            for name in ("ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")
        ),
    )
}


def read_movielens(root: str | os.PathLike[str], variant: str | None = None, *, download: bool = False) -> RawLog:
    """Read a MovieLens release from ``root`` (the folder holding ``u.data``/``ratings.*``).

    Args:
        root: the folder with the files; a parent holding the unpacked release folder
            (e.g. ``root/ml-1m/ratings.dat``) works too.
        variant: ``ml-100k``, ``ml-1m``, ``ml-10m``, ``ml-20m``, ``ml-25m``, ``ml-32m``,
            ``ml-latest``, ``ml-latest-small``; detected from the files (or the folder name) when ``None``.
        download: fetch and verify the official zip when the files are absent.

    Returns:
        Interactions ``user, item, timestamp, rating``; items with ``title`` and ``categories``
        (genre lists); users with their features where the release has them.

    Raises:
        DataError: files absent (naming each expected file, the folder and the URL), a failed or
            corrupt download, or a malformed file.
    """
    root = Path(root)
    spec = _resolve_variant(root, variant)
    directory = _find_directory(root, spec)
    if directory is None:
        if not download:
            raise _missing_files_error(root, spec, "not found")
        directory = _download(spec, root)
    reader = {"100k": _read_100k, "dat": _read_dat, "csv": _read_csv_family}[spec.family]
    result = reader(directory, spec)
    result.source = f"{spec.name} at {directory}"
    result.extra["variant"] = spec.name
    return result


# --------------------------------------------------------------------------------------------
# locating the files
# --------------------------------------------------------------------------------------------


def _resolve_variant(root: Path, variant: str | None) -> Variant:
    """The declared variant, else the one the files (or the folder's name) point to."""
    if variant is not None:
        if variant not in VARIANTS:
            raise DataError(f"unknown MovieLens variant {variant!r}; known: {', '.join(VARIANTS)}", key="data.source.variant")
        return VARIANTS[variant]
    by_folder = {v.folder.lower(): v for v in VARIANTS.values()} | {v.name: v for v in VARIANTS.values()}
    for directory in (root, *(root / v.folder for v in VARIANTS.values())):
        guess = _guess_variant(directory)
        if guess is None:
            continue
        named = by_folder.get(directory.name.lower())
        return named if named is not None and named.family == guess.family else guess
    if root.name.lower() in by_folder:
        return by_folder[root.name.lower()]
    raise DataError(
        f"no MovieLens files in {root}: expected u.data (ml-100k), ratings.dat (ml-1m, ml-10m) or "
        f"ratings.csv (ml-20m, ml-25m, ml-latest); set data.source.variant to download one (data.source.download: true) "
        f"or point data.source.root at the unpacked folder", path=str(root), key="data.source.variant",
    )


def _guess_variant(directory: Path) -> Variant | None:
    """The release whose ratings file is in ``directory`` (ml-1m is the ``::`` one with users.dat)."""
    if (directory / "u.data").is_file():
        return VARIANTS["ml-100k"]
    if (directory / "ratings.dat").is_file():
        return VARIANTS["ml-1m" if (directory / "users.dat").is_file() else "ml-10m"]
    if (directory / "ratings.csv").is_file():
        return VARIANTS["ml-latest"]
    return None


def _find_directory(root: Path, spec: Variant) -> Path | None:
    for directory in (root, root / spec.folder, root / spec.name):
        if all((directory / f).is_file() for f in spec.required):
            return directory
    return None


def _missing_files_error(root: Path, spec: Variant, reason: str) -> DataError:
    optional = f" (and optionally {', '.join(spec.optional)})" if spec.optional else ""
    return DataError(
        f"MovieLens {spec.name} files {reason}: expected {', '.join(spec.required)}{optional} in the directory "
        f"{root}. Get them from {spec.url} (unzip it so that {root / spec.ratings} exists), or set "
        f"data.source.download: true to fetch and verify it automatically",
        path=str(root), key="data.source.root",
    )


# --------------------------------------------------------------------------------------------
# ml-100k
# --------------------------------------------------------------------------------------------


def _read_100k(directory: Path, spec: Variant) -> RawLog:
    labels = {USER: "user_id", ITEM: "item_id", RATING: "rating", TIMESTAMP: "timestamp"}
    ratings = read_table(directory / "u.data", {USER: 0, ITEM: 1, RATING: 2, TIMESTAMP: 3},
                         {USER: "id", ITEM: "id", RATING: "float", TIMESTAMP: "timestamp"},
                         sep="\t", fmt="tsv", key_prefix=None, labels=labels)
    genres = _read_100k_genres(directory / "u.genre")
    items = _read_100k_items(directory / "u.item", genres)
    users = _read_100k_users(directory / "u.user") if (directory / "u.user").is_file() else None
    return RawLog(interactions=ratings[[USER, ITEM, TIMESTAMP, RATING]], items=items, users=users)


def _read_100k_genres(path: Path) -> list[str]:
    """Genre names ordered by their index in ``u.genre`` (``name|index`` lines)."""
    frame = _read_small_delimited(path, "|", 2)
    order = pd.to_numeric(frame[1], errors="coerce")
    if order.isna().any():
        raise DataError(f"expected 'name|index' lines, got index {frame[1][order.isna()].iloc[0]!r}", path=str(path),
                        line=int(np.argmax(order.isna().to_numpy())) + 1)
    return frame[0].to_numpy(dtype=object)[np.argsort(order.to_numpy(), kind="stable")].tolist()


def _read_100k_items(path: Path, genres: list[str]) -> pd.DataFrame:
    """``id|title|release|video release|url|flag x 19``: the flags become genre lists."""
    frame = _read_small_delimited(path, "|", 5 + len(genres))
    flags = frame.iloc[:, 5:].to_numpy() == "1"
    return _object_frame({
        ITEM: frame[0].str.strip(),
        "title": frame[1],
        "categories": _flags_to_lists(flags, genres),
    })


def _read_100k_users(path: Path) -> pd.DataFrame:
    frame = _read_small_delimited(path, "|", 5)
    return _users_frame(frame, [0, 1, 2, 3, 4], path)


def _flags_to_lists(flags: np.ndarray, names: list[str]) -> list[list[str]]:
    """A 0/1 item x genre matrix -> one list of genre names per item (np.nonzero + split, no row loop)."""
    rows, cols = np.nonzero(flags)
    names_arr = np.array(names, dtype=object)
    bounds = np.searchsorted(rows, np.arange(1, flags.shape[0]))
    return [chunk.tolist() for chunk in np.split(names_arr[cols], bounds)]


# --------------------------------------------------------------------------------------------
# ml-1m, ml-10m (``::``)
# --------------------------------------------------------------------------------------------


def _read_dat(directory: Path, spec: Variant) -> RawLog:
    labels = {USER: "UserID", ITEM: "MovieID", RATING: "Rating", TIMESTAMP: "Timestamp"}
    ratings = read_table(directory / "ratings.dat", {USER: 0, ITEM: 2, RATING: 4, TIMESTAMP: 6},
                         {USER: "id", ITEM: "id", RATING: "float", TIMESTAMP: "timestamp"},
                         sep=":", fmt="csv", key_prefix=None, labels=labels)
    items = _read_movies_dat(directory / "movies.dat")
    users = None
    if (directory / "users.dat").is_file():  # ml-1m: UserID::Gender::Age::Occupation::Zip-code
        frame = _read_small_delimited(directory / "users.dat", ":", 9)
        users = _users_frame(frame, [0, 4, 2, 6, 8], directory / "users.dat")
    return RawLog(interactions=ratings[[USER, ITEM, TIMESTAMP, RATING]], items=items, users=users)


def _read_movies_dat(path: Path) -> pd.DataFrame:
    """``MovieID::Title::Genres``; the title may contain ``:`` so split on the first and last ``::``."""
    lines = pd.Series(_read_text(path).splitlines(), dtype=object)
    keep = lines.str.strip() != ""
    parts = lines[keep].str.extract(r"^\s*([^:]+?)\s*::(.*)::([^:]*)$")
    bad = parts[0].isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"expected 'MovieID::Title::Genres', got {lines[keep].iloc[row]!r}", path=str(path),
                        line=int(lines.index[keep][row]) + 1)
    return _items_frame(parts[0], parts[1], parts[2], path, line_offset=1)


# --------------------------------------------------------------------------------------------
# ml-20m and later (csv)
# --------------------------------------------------------------------------------------------


def _read_csv_family(directory: Path, spec: Variant) -> RawLog:
    columns = {USER: "userId", ITEM: "movieId", RATING: "rating", TIMESTAMP: "timestamp"}
    ratings = read_table(directory / "ratings.csv", columns,
                         {USER: "id", ITEM: "id", RATING: "float", TIMESTAMP: "timestamp"}, fmt="csv", key_prefix=None)
    path = directory / "movies.csv"
    movies = pd.read_csv(io.StringIO(_read_text(path)), dtype=str, na_filter=False)
    missing = [c for c in ("movieId", "title", "genres") if c not in movies]
    if missing:
        raise DataError(f"missing column(s) {missing}; expected header movieId,title,genres, got {list(movies)}",
                        path=str(path), line=1)
    items = _items_frame(movies["movieId"], movies["title"], movies["genres"], path, line_offset=2)
    return RawLog(interactions=ratings[[USER, ITEM, TIMESTAMP, RATING]], items=items)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """Decode as UTF-8, else latin-1: GroupLens used both (u.item and ml-1m are latin-1)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_small_delimited(path: Path, sep: str, n_fields: int) -> pd.DataFrame:
    """Read a small side file whole (no quoting: titles contain ``"``) and check its field count."""
    text = _read_text(path)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, header=None, dtype=str, na_filter=False,
                            quoting=3, names=list(range(n_fields)), index_col=False)
    except pd.errors.ParserError as err:
        found = re.search(r"line (\d+)", str(err))
        raise DataError(f"expected {n_fields} {sep!r}-separated fields per line ({err})", path=str(path),
                        line=int(found.group(1)) if found else None) from None
    if frame.empty:
        raise DataError("the file is empty", path=str(path))
    return frame


def _items_frame(ids: pd.Series, titles: pd.Series, genres: pd.Series, path: Path, line_offset: int) -> pd.DataFrame:
    """Movies with genre lists; ``line_offset`` turns the index of ``ids`` into a 1-based line."""
    ids = ids.astype(str).str.strip()
    empty = (ids == "").to_numpy()
    if empty.any():
        raise DataError("empty movie id", path=str(path), line=int(ids.index[np.argmax(empty)]) + line_offset)
    return _object_frame({
        ITEM: ids,
        "title": titles.astype(str),
        "categories": split_categories(genres, "|", none_marker=NO_GENRES),
    })


def _users_frame(frame: pd.DataFrame, order: list[int], path: Path) -> pd.DataFrame:
    """``user, age, gender, occupation, zip`` from the given field positions (ages as numbers)."""
    user, age, gender, occupation, zip_code = (frame[i].astype(str).str.strip() for i in order)
    ages = pd.to_numeric(age, errors="coerce")
    if ages.isna().any():
        row = int(np.argmax(ages.isna().to_numpy()))
        raise DataError(f"age {age.iloc[row]!r} is not a number", path=str(path), line=row + 1)
    frame = _object_frame({USER: user, "gender": gender, "occupation": occupation, "zip": zip_code})
    frame.insert(1, "age", ages.to_numpy(dtype=np.int64))
    return frame


def _object_frame(columns: dict) -> pd.DataFrame:
    """Text columns as ``object`` of Python str, as the schema declares (pandas 3 would infer ``str``)."""
    return pd.DataFrame({name: pd.Series(np.asarray(values, dtype=object) if not isinstance(values, list)
                                         else _list_column(values), dtype=object)
                         for name, values in columns.items()})


def _list_column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------


def _download(spec: Variant, root: Path) -> Path:
    """Fetch, verify and unpack ``spec``'s zip into ``root``; nothing partial is ever left behind.

    Everything happens in a temporary folder next to ``root``; files reach ``root`` by rename only
    after the md5 (and ml-100k's sha256) matched, the ratings file last, so its presence means the
    release is complete.
    """
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)  # a download killed mid-way left its zip (up to ~900 MB) here
    work = Path(tempfile.mkdtemp(prefix=temp_prefix(root.name), suffix=".tmp", dir=parent))
    try:
        try:
            expected_md5 = _fetch_md5(spec.url + ".md5")
            archive = work / f"{spec.name}.zip"
            actual_md5 = _fetch_to_file(spec.url, archive)
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise _missing_files_error(root, spec, f"not found and the download failed ({_reason(err)})") from None
        if actual_md5 != expected_md5:
            raise DataError(f"download of {spec.url} is corrupt: md5 {actual_md5} but GroupLens publishes "
                            f"{expected_md5}; try again later or download it by hand", path=str(root))
        unpacked = _extract(archive, work / "unpacked", spec)
        _verify_pinned(unpacked, spec)
        _move_into_place(unpacked, root, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        return f"offline or host unreachable: {err.reason}"
    return str(err) or type(err).__name__


def _fetch_md5(url: str) -> str:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        text = response.read(4096).decode("ascii", "replace")
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if found is None:
        raise ValueError(f"no md5 digest in {url}")
    return found.group(0).lower()


def _fetch_to_file(url: str, dest: Path) -> str:
    """Stream ``url`` to ``dest``, returning its md5; a short read is an error, not a smaller file."""
    digest, size = hashlib.md5(), 0
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
    if expected is not None and int(expected) != size:
        raise ValueError(f"incomplete download: {size} of {expected} bytes")
    return digest.hexdigest()


def _extract(archive: Path, dest: Path, spec: Variant) -> Path:
    """Unpack and return the folder that holds the release's files."""
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)  # extractall drops absolute paths and '..' components
    except zipfile.BadZipFile as err:
        raise DataError(f"downloaded archive {spec.url} is not a valid zip ({err})") from None
    for candidate in (dest / spec.folder, dest):
        if all((candidate / f).is_file() for f in spec.required):
            return candidate
    raise DataError(f"the archive {spec.url} does not contain {', '.join(spec.required)}")


def _verify_pinned(directory: Path, spec: Variant) -> None:
    if spec.name != "ml-100k":
        return
    digest = hashlib.sha256((directory / "u.data").read_bytes()).hexdigest()
    if digest != ML100K_UDATA_SHA256:
        raise DataError(f"u.data from {spec.url} has sha256 {digest}, expected {ML100K_UDATA_SHA256}; "
                        "the download is not the published ml-100k")


def _move_into_place(unpacked: Path, root: Path, spec: Variant) -> None:
    if not root.exists():
        os.rename(unpacked, root)
        return
    names = sorted(p.name for p in unpacked.iterdir())
    for name in sorted(names, key=lambda n: n == spec.ratings):  # ratings last: it marks completeness
        os.replace(unpacked / name, root / name)
