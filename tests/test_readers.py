"""Readers: round trips for every format and one clear DataError per kind of bad input.

Every file is written into tmp_path; nothing here reads /work/shared or the network.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.data import movielens
from rectrain.data.movielens import read_movielens
from rectrain.data.readers import iter_interactions, read_interactions, read_sessions
from rectrain.errors import DataError

COLUMNS = {"user": "uid", "item": "iid", "timestamp": "ts", "rating": "r"}


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def read_error(path: Path, columns=COLUMNS, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_interactions(path, columns, **kwargs)
    return str(info.value)


def assert_canonical(frame: pd.DataFrame, columns: list[str]) -> None:
    assert list(frame.columns) == columns
    for name in columns:
        expected = np.float64 if name in ("timestamp", "rating") else object
        assert frame[name].dtype == expected, name
    assert isinstance(frame.index, pd.RangeIndex)


# ------------------------------------------------------------------ round trips


def test_csv_round_trip_keeps_values_dtypes_and_file_order(tmp_path):
    path = write(tmp_path / "log.csv", "extra,uid,iid,ts,r\nx,12,7,300,4.5\ny, 3 ,08,100.25,3\n\nz,12,7,200,1\n")
    frame = read_interactions(path, COLUMNS).interactions
    assert_canonical(frame, ["user", "item", "timestamp", "rating"])
    assert frame["user"].tolist() == ["12", "3", "12"]  # str, stripped, never "12.0"
    assert frame["item"].tolist() == ["7", "08", "7"]  # leading zeros are part of an id
    assert frame["timestamp"].tolist() == [300.0, 100.25, 200.0]  # file order, not sorted
    assert frame["rating"].tolist() == [4.5, 3.0, 1.0]
    assert all(type(v) is str for v in frame["user"])


def test_tsv_gz_and_session_only_mapping(tmp_path):
    path = tmp_path / "clicks.tsv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("sid\titem\ttime\n5\t100\t1.5\n5\t101\t2.5\n6\t100\t3.0\n")
    log = read_interactions(path, {"session": "sid", "item": "item", "timestamp": "time"})
    frame = log.interactions
    assert_canonical(frame, ["user", "item", "timestamp", "session"])
    assert frame["user"].tolist() == frame["session"].tolist() == ["5", "5", "6"]
    assert log.source == str(path)


def test_parquet_round_trip_reads_batches_in_order_and_ids_as_int_strings(tmp_path, monkeypatch):
    from rectrain.data import readers

    monkeypatch.setattr(readers, "_PARQUET_BATCH_ROWS", 2)  # several batches over several row groups
    table = pa.table({
        "u": pa.array([12, 3, 12, 7, 5], pa.int64()),
        "i": pa.array([1.0, 2.0, 3.0, 4.0, 5.0]),  # float ids that are whole numbers -> "1", not "1.0"
        "t": pa.array([50, 10, 40, 30, 20], pa.int32()),
        "unused": pa.array(["a"] * 5),
    })
    path = tmp_path / "log.parquet"
    pq.write_table(table, path, row_group_size=3)
    frame = read_interactions(path, {"user": "u", "item": "i", "timestamp": "t"}).interactions
    assert_canonical(frame, ["user", "item", "timestamp"])
    assert frame["user"].tolist() == ["12", "3", "12", "7", "5"]
    assert frame["item"].tolist() == ["1", "2", "3", "4", "5"]
    assert frame["timestamp"].tolist() == [50.0, 10.0, 40.0, 30.0, 20.0]


def test_parquet_datetime_column_becomes_epoch_seconds(tmp_path):
    times = pd.to_datetime(["1970-01-01 00:00:10", "2000-01-01 00:00:00"]).as_unit("us")
    path = tmp_path / "log.pq"
    pd.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": times}).to_parquet(path)
    frame = read_interactions(path, {"user": "u", "item": "i", "timestamp": "t"}).interactions
    assert frame["timestamp"].tolist() == [10.0, 946684800.0]


def test_headerless_file_with_positions(tmp_path):
    path = write(tmp_path / "u.txt", "1\t10\t5\t100\n2\t20\t4\t90\n")
    frame = read_interactions(path, {"user": 0, "item": 1, "rating": 2, "timestamp": 3}).interactions
    assert frame["user"].tolist() == ["1", "2"] and frame["timestamp"].tolist() == [100.0, 90.0]


@pytest.mark.parametrize(
    ("fmt", "values", "expected"),
    [
        ("iso", ["1970-01-01T00:00:01.5Z", "1970-01-02 00:00:00", "1970-01-01T01:00:00+01:00"], [1.5, 86400.0, 0.0]),
        ("%d/%m/%Y %H:%M", ["01/01/1970 00:01", "02/01/1970 00:00", "01/01/1970 01:00"], [60.0, 86400.0, 3600.0]),
        ("ms", ["1500", "0", "86400000"], [1.5, 0.0, 86400.0]),
    ],
)
def test_timestamp_formats(tmp_path, fmt, values, expected):
    path = write(tmp_path / "log.csv", "u;i;when\n" + "".join(f"u{k};i{k};{v}\n" for k, v in enumerate(values)))
    frame = read_interactions(path, {"user": "u", "item": "i", "timestamp": "when"}, sep=";",
                              timestamp_format=fmt).interactions
    assert frame["timestamp"].tolist() == pytest.approx(expected)


def test_item_features_split_categories(tmp_path):
    log_path = write(tmp_path / "log.csv", "u,i,t\n1,a,1\n")
    items_path = write(tmp_path / "items.csv", 'id,name,cats\na,"Caf\u00e9, Le",X|Y\nb,B,\n', encoding="latin-1")
    log = read_interactions(log_path, {"user": "u", "item": "i", "timestamp": "t"}, item_features={
        "path": str(items_path), "encoding": "latin-1",
        "columns": {"item": "id", "title": "name", "categories": "cats"},
    })
    assert log.items["item"].tolist() == ["a", "b"]
    assert log.items["title"].tolist() == ["Caf\u00e9, Le", "B"]
    assert log.items["categories"].tolist() == [["X", "Y"], []]


def test_read_sessions_fills_user_and_session(tmp_path):
    path = write(tmp_path / "train.tsv", "SessionId\tItemId\tTime\n1\t214716935\t1396437466.94\n1\t9\t1396438212.318\n"
                                         "2\t9\t1396438300\n")
    frame = read_sessions(path).interactions
    assert_canonical(frame, ["user", "item", "timestamp", "session"])
    assert frame["session"].tolist() == frame["user"].tolist() == ["1", "1", "2"]
    assert frame["item"].tolist() == ["214716935", "9", "9"]
    assert frame["timestamp"].tolist() == [1396437466.94, 1396438212.318, 1396438300.0]


def test_read_sessions_names_the_expected_header(tmp_path):
    path = write(tmp_path / "train.tsv", "session\titem\ttime\n1\t2\t3\n")
    with pytest.raises(DataError) as info:
        read_sessions(path)
    assert "'SessionId' not found" in str(info.value) and "'session', 'item', 'time'" in str(info.value)


# ------------------------------------------------------------------ MovieLens miniatures

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_ml100k(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write(root / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t242\t1\t878887116\n")
    write(root / "u.genre", "".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n")
    write(root / "u.item", f"242|Kolya (1996)|24-Jan-1997||http://x|{flags('Comedy')}\n"
                           f"302|Mis\u00e9rables, Les (1995)|01-Jan-1995||http://x|{flags('Drama', 'Musical')}\n",
          encoding="latin-1")
    write(root / "u.user", "196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n")
    return root


def test_ml100k_miniature(tmp_path):
    log = read_movielens(write_ml100k(tmp_path / "ml-100k"))
    frame = log.interactions
    assert_canonical(frame, ["user", "item", "timestamp", "rating"])
    assert frame["user"].tolist() == ["196", "186", "22"] and frame["rating"].tolist() == [3.0, 3.0, 1.0]
    items = log.items.set_index("item")
    assert items.loc["302", "title"] == "Mis\u00e9rables, Les (1995)"  # latin-1 decoded
    assert items.loc["302", "categories"] == ["Drama", "Musical"] and items.loc["242", "categories"] == ["Comedy"]
    assert log.users["zip"].tolist()[1] == "00000" and log.users["age"].tolist() == [49, 39, 25]
    assert log.extra["variant"] == "ml-100k"


def test_ml1m_miniature_latin1_and_double_colon(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    write(root / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(root / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                               "661::Am\u00e9lie: Le Fabuleux Destin (2001)::Comedy|Romance\n", encoding="latin-1")
    write(root / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    log = read_movielens(tmp_path)  # the parent folder works too
    assert log.extra["variant"] == "ml-1m"
    frame = log.interactions
    assert_canonical(frame, ["user", "item", "timestamp", "rating"])
    assert frame["item"].tolist() == ["1193", "661", "1193"] and frame["timestamp"].tolist()[0] == 978300760.0
    items = log.items.set_index("item")
    assert items.loc["661", "title"] == "Am\u00e9lie: Le Fabuleux Destin (2001)"
    assert items.loc["661", "categories"] == ["Comedy", "Romance"]
    assert log.users.set_index("user").loc["2", "age"] == 56


def test_ml20m_miniature_csv(tmp_path):
    root = tmp_path / "ml-20m"
    root.mkdir()
    write(root / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n")
    write(root / "movies.csv", 'movieId,title,genres\n2,"Jumanji, The (1995)",Adventure|Children|Fantasy\n'
                               "29,Cit\u00e9 des enfants perdus (1995),(no genres listed)\n")
    log = read_movielens(root)
    assert log.extra["variant"] == "ml-20m"
    assert log.interactions["rating"].tolist() == [3.5, 3.5]
    items = log.items.set_index("item")
    assert items.loc["2", "title"] == "Jumanji, The (1995)"
    assert items.loc["2", "categories"] == ["Adventure", "Children", "Fantasy"]
    assert items.loc["29", "categories"] == [] and items.loc["29", "title"].startswith("Cit\u00e9")


# ------------------------------------------------------------------ bad input: one clear DataError each


def test_missing_file_names_the_path(tmp_path):
    message = read_error(tmp_path / "nope.csv")
    assert str(tmp_path / "nope.csv") in message and "not found" in message


def test_empty_file_and_header_only(tmp_path):
    assert "empty (0 bytes)" in read_error(write(tmp_path / "a.csv", ""))
    assert "no data rows" in read_error(write(tmp_path / "b.csv", "uid,iid,ts,r\n\n"))


def test_missing_column_names_config_key_and_available_columns(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,iid,ts,r\n1,2,3,4\n")
    message = read_error(path)
    assert "data.source.columns.user" in message and "'uid' not found" in message
    assert "'user_id', 'iid', 'ts', 'r'" in message and str(path) in message


def test_wrong_separator_hint(tmp_path):
    assert "separator ';'" in read_error(write(tmp_path / "log.csv", "uid;iid;ts;r\n1;2;3;4\n"))


def test_duplicate_header(tmp_path):
    message = read_error(write(tmp_path / "log.csv", "uid,iid,ts,ts,r\n1,2,3,3,4\n"))
    assert "twice" in message and "column 'ts'" in message and "line 1" in message


def test_non_numeric_timestamp_names_line_column_and_value(tmp_path):
    path = write(tmp_path / "log.csv", "uid,iid,ts,r\n1,2,100,4\n1,3,2020-01-01,4\n")
    message = read_error(path)
    assert str(path) in message and "line 3" in message and "column 'ts'" in message and "'2020-01-01'" in message
    assert "data.source.timestamp_format" in message


def test_line_numbers_count_blank_lines(tmp_path):
    message = read_error(write(tmp_path / "log.csv", "uid,iid,ts,r\n\n1,2,100,4\n\n\n1,3,oops,4\n"))
    assert "line 6" in message


def test_bad_iso_timestamp(tmp_path):
    path = write(tmp_path / "log.csv", "uid,iid,ts,r\n1,2,2020-01-01,4\n1,3,yesterday,4\n")
    message = read_error(path, timestamp_format="iso")
    assert "line 3" in message and "'yesterday'" in message


@pytest.mark.parametrize("bad", ["", "NaN", "  "])
def test_missing_id_names_line_and_column(tmp_path, bad):
    message = read_error(write(tmp_path / "log.csv", f"uid,iid,ts,r\n1,2,100,4\n1,{bad},100,4\n"))
    assert "line 3" in message and "column 'iid'" in message and "missing id" in message


def test_non_numeric_rating(tmp_path):
    message = read_error(write(tmp_path / "log.csv", "uid,iid,ts,r\n1,2,100,4\n1,2,100,4\n1,2,100,five\n"))
    assert "line 4" in message and "column 'r'" in message and "'five'" in message


def test_encoding_error_suggests_latin1(tmp_path):
    path = write(tmp_path / "log.csv", "uid,iid,ts,r\n1,2,100,4\n1,Am\u00e9lie,100,4\n", encoding="latin-1")
    message = read_error(path)
    assert str(path) in message and "line 3" in message and "data.source.encoding" in message and "latin-1" in message
    frame = read_interactions(path, COLUMNS, encoding="latin-1").interactions
    assert frame["item"].tolist() == ["2", "Am\u00e9lie"]


@pytest.mark.parametrize("row", ["1,2,100", "1,2,100,4,x,9"])
def test_wrong_number_of_fields(tmp_path, row):
    message = read_error(write(tmp_path / "log.csv", f"uid,iid,ts,r,extra\n1,2,100,4,x\n1,2,100,4,x\n{row}\n"))
    assert "line 4" in message and "field" in message


def test_wrong_number_of_fields_in_quoted_file(tmp_path):
    path = write(tmp_path / "log.csv", 'uid,iid,ts,r\n"1",2,100,4\n1,2,100,4,9\n')
    assert "line 3" in read_error(path)


def _long_log_with_a_bad_value(bad: str) -> str:
    """3,000 rows with blank lines and padding, ``bad`` on line 2,611."""
    lines = ["uid,iid,ts,r"]
    for row in range(3000):
        if row % 250 == 0:
            lines.append("")
        lines.append(f" {row % 97},{row % 31} ,{1000 + row},{row % 5}")
    lines[2611 - 1] = bad
    return "\n".join(lines) + "\n"


STREAMED = [  # (file text, reader options): each must fail the same whole and streamed in chunks
    ("uid,iid,ts,r\n1,2,100,4\n1,3,2020-01-01,4\n", {}),
    ("uid,iid,ts,r\n\n1,2,100,4\n\n\n1,3,oops,4\n", {}),
    ("uid,iid,ts,r\n1,2,2020-01-01,4\n1,3,yesterday,4\n", {"timestamp_format": "iso"}),
    ("uid,iid,ts,r\n1,2,100,4\n1, ,100,4\n", {}),
    ("uid,iid,ts,r\n1,2,100,4\n1,2,100,4\n1,2,100,five\n", {}),
    ("uid,iid,ts,r,extra\n1,2,100,4,x\n1,2,100,4,x\n1,2,100\n", {}),
    ('uid,iid,ts,r\n"1",2,100,4\n1,2,100,4,9\n', {}),
    ("uid,iid,ts,r\n\n", {}),
    (_long_log_with_a_bad_value("5,6,1e3,four"), {}),  # a text rating in a later chunk: re-read as text
    (_long_log_with_a_bad_value("5,NaN,1e3,4"), {}),
    (_long_log_with_a_bad_value("5,6,,4"), {}),
]


@pytest.mark.parametrize("case,chunk_rows", [(case, rows) for case, (text, _) in enumerate(STREAMED)
                                             for rows in (1, 7, 1000) if rows > 1 or len(text) < 1000])
def test_a_log_streamed_in_chunks_fails_as_the_whole_read_does(tmp_path, case, chunk_rows):
    """Same message (file, exact line, column, value, key) whichever chunk holds the bad row (a row
    per chunk only on the short logs: 3,000 chunks take seconds)."""
    text, options = STREAMED[case]
    path = write(tmp_path / "log.csv", text)
    whole = read_error(path, **options)
    with pytest.raises(DataError) as info:
        list(iter_interactions(path, COLUMNS, chunk_rows=chunk_rows, **options))
    assert str(info.value) == whole
    if case >= len(STREAMED) - 3:
        assert "line 2611" in whole


@pytest.mark.parametrize("chunk_rows", [7, 1000, None])
def test_a_log_streamed_in_chunks_equals_the_whole_read(tmp_path, chunk_rows):
    path = write(tmp_path / "log.csv", _long_log_with_a_bad_value(" 5 , 006 ,1e3,4"))
    want = read_interactions(path, COLUMNS).interactions
    chunks = list(iter_interactions(path, COLUMNS, chunk_rows=chunk_rows))
    assert len(chunks) == (1 if chunk_rows is None else -(-3000 // chunk_rows))
    got = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(got, want)
    assert (got["item"] == "006").sum() == 1 and all(type(v) is str for v in got["user"])


def test_unknown_role_and_missing_required_role(tmp_path):
    path = write(tmp_path / "log.csv", "uid,iid,ts\n1,2,3\n")
    assert "data.source.columns.timstamp" in read_error(path, {"user": "uid", "item": "iid", "timstamp": "ts"})
    assert "data.source.columns.timestamp" in read_error(path, {"user": "uid", "item": "iid"})


def test_unknown_extension(tmp_path):
    assert "data.source.format" in read_error(write(tmp_path / "log.json", "{}"))


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"uid": ["1", None], "iid": ["2", "3"], "ts": [1.0, 2.0], "r": [1.0, 2.0]}), path)
    message = read_error(path)
    assert "row 2" in message and "column 'uid'" in message
    pq.write_table(pa.table({"uid": ["1"], "iid": ["2"], "ts": [1.0]}), path)
    assert "data.source.columns.rating" in read_error(path) and "'uid', 'iid', 'ts'" in read_error(path)


# ------------------------------------------------------------------ MovieLens files absent / download


def test_movielens_missing_files_without_download(tmp_path):
    root = tmp_path / "ml-100k"
    with pytest.raises(DataError) as info:
        read_movielens(root)
    message = str(info.value)
    assert "u.data" in message and "u.item" in message and str(root) in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_offline_download_raises_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data" / "ml-1m"
    with pytest.raises(DataError) as info:
        read_movielens(root, "ml-1m", download=True)
    message = str(info.value)
    assert "ratings.dat" in message and "movies.dat" in message and str(root) in message
    assert "offline" in message and "ml-1m.zip" in message
    assert leftovers(tmp_path) == ["data"]  # no partial zip, no temp folder


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(monkeypatch, files: dict[str, bytes]) -> None:
    def urlopen(url, timeout=None):
        assert timeout is not None
        return FakeResponse(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def zipped(folder: str, files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"{folder}/{name}", text.encode("latin-1"))
    return buffer.getvalue()


def test_download_verifies_md5_and_unpacks(tmp_path, monkeypatch):
    archive = zipped("ml-1m", {"ratings.dat": "1::2::5::10\n", "movies.dat": "2::Toy (1995)::Comedy\n",
                               "users.dat": "1::F::1::10::48067\n"})
    url = movielens.BASE_URL + "ml-1m.zip"
    serve(monkeypatch, {url: archive, url + ".md5": f"MD5 (ml-1m.zip) = {hashlib.md5(archive).hexdigest()}\n".encode()})
    log = read_movielens(tmp_path / "ml-1m", download=True)
    assert log.interactions["item"].tolist() == ["2"] and log.items["categories"].tolist() == [["Comedy"]]
    assert leftovers(tmp_path) == ["ml-1m", "ml-1m/movies.dat", "ml-1m/ratings.dat", "ml-1m/users.dat"]


def test_download_with_bad_md5_leaves_nothing(tmp_path, monkeypatch):
    archive = zipped("ml-1m", {"ratings.dat": "1::2::5::10\n", "movies.dat": "2::Toy (1995)::Comedy\n"})
    url = movielens.BASE_URL + "ml-1m.zip"
    serve(monkeypatch, {url: archive, url + ".md5": b"0" * 32})
    with pytest.raises(DataError, match="corrupt"):
        read_movielens(tmp_path / "ml-1m", "ml-1m", download=True)
    assert leftovers(tmp_path) == []


def test_ml100k_download_checks_pinned_sha256(tmp_path, monkeypatch):
    files = {"u.data": "1\t2\t3\t4\n", "u.item": f"2|T|||x|{flags('Drama')}\n", "u.genre": "unknown|0\n"}
    archive = zipped("ml-100k", files)
    url = movielens.BASE_URL + "ml-100k.zip"
    serve(monkeypatch, {url: archive, url + ".md5": hashlib.md5(archive).hexdigest().encode()})
    with pytest.raises(DataError, match="sha256"):
        read_movielens(tmp_path / "ml-100k", download=True)
    assert leftovers(tmp_path) == []


def test_item_features_duplicate_id(tmp_path):
    log_path = write(tmp_path / "log.csv", "u,i,t\n1,a,1\n")
    items_path = write(tmp_path / "items.csv", "id,name\na,A\nb,B\na,C\n")
    with pytest.raises(DataError) as info:
        read_interactions(log_path, {"user": "u", "item": "i", "timestamp": "t"},
                          item_features={"path": str(items_path), "columns": {"item": "id", "title": "name"}})
    assert "line 4" in str(info.value) and "'a' appears twice" in str(info.value)


def test_ml100k_bad_rating_line_names_file_and_field(tmp_path):
    root = write_ml100k(tmp_path / "ml-100k")
    write(root / "u.data", "196\t242\t3\t881250949\n186\t302\tx\t891717742\n")
    with pytest.raises(DataError) as info:
        read_movielens(root)
    message = str(info.value)
    assert "u.data" in message and "line 2" in message and "column 'rating'" in message
