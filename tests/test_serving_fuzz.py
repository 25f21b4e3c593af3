"""No request makes the service answer 5xx: Hypothesis-generated bodies against the live HTTP service,
and a reload storm (concurrent reloads while the file set is replaced, atomically or not) in which
every answer still comes from one consistent file set."""
from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rectrain.serving import Scorer, ServiceLimits, serve_in_thread

pytest_plugins = ["tests.test_export_fixtures"]

TOKEN = "fuzz-token"
ENDPOINTS = ("/recommend", "/score", "/admin/reload")
FIELDS = ("history", "k", "exclude", "exclude_seen", "id", "items", "calibrated", "user_features", "user")
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


def _copy_export(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.parent.glob(f"{src.name.removesuffix('.onnx')}.*"):
        shutil.copy2(f, dest / f.name)
    return dest / src.name


class Conn:
    """One keep-alive connection, reopened whenever the service closes it (413, 408, 411)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token and path.startswith("/admin"):
            headers["Authorization"] = f"Bearer {token}"
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.reopen()
                return response.status, json.loads(payload)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.reopen()  # a keep-alive connection closed by its idle timeout: one retry
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[int, Any]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def reopen(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


class Fuzzed:
    """The live service under fuzz, and the checks every answer must pass."""

    def __init__(self, scorer: Scorer, port: int) -> None:
        self.scorer, self.conn = scorer, Conn(port)
        self.statuses: dict[int, int] = {}

    def send(self, path: str, body: bytes) -> None:
        status, answer = self.conn.post(path, body)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, (status, answer, body[:300])
        if status >= 400:
            assert set(answer) >= {"error", "status"} and answer["status"] == status and answer["error"], answer
        elif path == "/recommend":
            for one in answer if isinstance(answer, list) else [answer]:
                assert len(one["items"]) == len(one["scores"]) and all(math.isfinite(s) for s in one["scores"])

    def assert_healthy(self) -> None:
        status, body = self.conn.get("/healthz")
        assert status == 200 and body["status"] == "ok"
        vocab = self.scorer.model.item_vocab
        request = {"history": vocab[:4], "k": 5}
        status, answer = self.conn.post("/recommend", json.dumps(request).encode())
        assert status == 200 and answer["items"] == self.scorer.recommend(request)["items"]


@pytest.fixture(scope="module")
def fuzzed(exports, tmp_path_factory):
    path = _copy_export(exports["two_tower"], tmp_path_factory.mktemp("fuzz"))
    scorer = Scorer.load(path, max_k=50)
    with serve_in_thread(scorer, limits=ServiceLimits(max_body=256 * 1024), admin_token=TOKEN) as srv:
        yield Fuzzed(scorer, srv.port)


# --- strategies: JSON *texts*, so that what json.dumps refuses (huge ints, NaN, lone surrogates) is sent too
def _float_text(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


odd_strings = st.one_of(
    st.text(max_size=30).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.text(max_size=10).map(json.dumps),  # \\u escapes, surrogate pairs included
    st.sampled_from(['"\\ud800"', '"\\udfff"', '"a\\ud83d"', '"\\ude00b"', '"\\ud83d\\ude00"', '"\\u0000"', '""',
                     '"' + "x" * 5000 + '"']),
)
scalars = st.one_of(
    st.none().map(lambda _: "null"), st.booleans().map(lambda b: "true" if b else "false"),
    st.integers().map(str), st.integers(-2**70, 2**70).map(str),
    st.integers(4290, 6000).map(lambda n: "9" * n), st.integers(4290, 6000).map(lambda n: "-" + "1" * n),
    st.floats(allow_nan=True, allow_infinity=True).map(_float_text),
    st.sampled_from(["1e400", "-1e400", "1e-400", "0.0", "-0", "2.0", "1E3"]),
    odd_strings,
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)).map(json.dumps) | st.sampled_from(['"\\ud800"'])
json_texts = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(keys, children), max_size=6).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}")),
    max_leaves=25,
)


def id_texts(vocab: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(vocab).map(json.dumps), scalars)


def request_texts(vocab: list[str], path: str) -> st.SearchStrategy[str]:
    """Objects with the endpoint's field names (now and then a foreign one) and values that are valid
    about half the time, of every other type otherwise: reaches both the answering and refusing paths."""
    ids = st.one_of(st.sampled_from(vocab).map(json.dumps), st.sampled_from(vocab).map(json.dumps),
                    st.sampled_from(vocab).map(int).map(str) if all(v.isdigit() for v in vocab) else scalars, scalars)
    id_lists = st.lists(ids, max_size=8).map(lambda xs: "[" + ",".join(xs) + "]")
    good_ids = st.lists(st.sampled_from(vocab), max_size=8).map(json.dumps)

    def either(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(valid, valid, valid, id_lists, json_texts)

    values = {"history": either(good_ids), "items": either(good_ids), "exclude": either(good_ids),
              "k": either(st.integers(-3, 60).map(str)), "exclude_seen": either(st.sampled_from(["true", "false"])),
              "calibrated": either(st.just("false")), "id": either(st.one_of(st.text(max_size=5).map(json.dumps),
                                                                              st.integers().map(str))),
              "user_features": either(st.just("null")), "user": either(ids)}
    own = ("history", "k", "exclude", "exclude_seen", "id") if path == "/recommend" else \
        ("history", "items", "calibrated", "id")
    required = {"history"} if path == "/recommend" else {"history", "items"}
    fields = st.tuples(st.sets(st.sampled_from(own)), st.sets(st.sampled_from(FIELDS), max_size=1),
                       st.integers(0, 9)).map(lambda t: sorted(t[0] | required | (t[1] if t[2] == 0 else set())))
    return fields.flatmap(lambda names: st.tuples(*(values[n] for n in names)).map(
        lambda vs: "{" + ",".join(f"{json.dumps(n)}:{v}" for n, v in zip(names, vs)) + "}"))


# --- the fuzz tests ----------------------------------------------------------------------------------------
def test_fuzz_arbitrary_json_values(fuzzed):
    @settings(FUZZ, max_examples=1000)
    @given(text=json_texts, path=st.sampled_from(ENDPOINTS), batch=st.booleans())
    def run(text: str, path: str, batch: bool) -> None:
        body = f"[{text},{text}]" if batch else text
        fuzzed.send(path, body.encode("utf-8", "surrogatepass"))

    run()
    fuzzed.assert_healthy()


def test_fuzz_request_shaped_bodies(fuzzed):
    vocab = fuzzed.scorer.model.item_vocab

    @settings(FUZZ, max_examples=1000)
    @given(data=st.data(), path=st.sampled_from(ENDPOINTS[:2]), batch=st.integers(0, 3))
    def run(data: st.DataObject, path: str, batch: int) -> None:
        text = data.draw(request_texts(vocab, path))
        body = text if not batch or path == "/score" else "[" + ",".join([text] * batch) + "]"
        fuzzed.send(path, body.encode("utf-8", "surrogatepass"))

    fuzzed.statuses.clear()
    run()
    assert fuzzed.statuses.get(200, 0) > 200, fuzzed.statuses  # the generator reaches the answering path, not only refusals
    fuzzed.assert_healthy()


def test_fuzz_raw_bytes(fuzzed):
    @settings(FUZZ, max_examples=600)
    @given(body=st.one_of(st.binary(max_size=200),
                          st.tuples(json_texts, st.binary(max_size=4), st.integers(0, 40)).map(
                              lambda t: t[0].encode("utf-8", "surrogatepass")[:t[2]] + t[1])),
           path=st.sampled_from(ENDPOINTS))
    def run(body: bytes, path: str) -> None:
        fuzzed.send(path, body)

    run()
    fuzzed.assert_healthy()


def test_fuzz_deep_nesting_and_huge_values(fuzzed):
    @settings(FUZZ, max_examples=120)
    @given(depth=st.integers(1, 20_000), opener=st.sampled_from(["[", '{"history":', '{"a":[']),
           closed=st.booleans(), path=st.sampled_from(ENDPOINTS))
    def run(depth: int, opener: str, closed: bool, path: str) -> None:
        closer = {"[": "]", '{"history":': "}", '{"a":[': "]}"}[opener]
        body = opener * depth + "1" + (closer * depth if closed else "")
        if len(body) <= 256 * 1024:
            fuzzed.send(path, body.encode())

    run()
    fuzzed.assert_healthy()


# --- reload storm -------------------------------------------------------------------------------------------
def _variant_with_other_item_vectors(src: Path, dest: Path) -> Path:
    """A second, self-consistent file set: the item vectors doubled, the main file pinning their sha256."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    main = _copy_export(src, dest)
    vectors_file = dest / "two_tower.item_vectors.onnx"
    graph = onnx.load(vectors_file)
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(graph, vectors_file)
    model = onnx.load(main)
    for prop in model.metadata_props:
        if prop.key == "rectrain.companions":
            pins = json.loads(prop.value)
            pins["item_vectors"]["sha256"] = hashlib.sha256(vectors_file.read_bytes()).hexdigest()
            prop.value = json.dumps(pins)
    onnx.save(model, main)
    return main


@pytest.mark.crash
def test_reload_storm_never_fails_a_request_and_never_mixes_file_sets(exports, tmp_path):
    sets = {"a": _copy_export(exports["two_tower"], tmp_path / "a"),
            "b": _variant_with_other_item_vectors(exports["two_tower"], tmp_path / "b")}
    live = _copy_export(exports["two_tower"], tmp_path / "live")
    names = ["two_tower.query.onnx", "two_tower.item_vectors.onnx", "two_tower.onnx"]  # the main file last
    vocab = Scorer.load(live).model.item_vocab
    score_request = {"history": vocab[:3], "items": vocab[3:9]}
    recommend_request = {"history": vocab[:3], "k": 5}
    expected: dict[str, tuple[list[float], list[str]]] = {}
    for path in sets.values():
        reference = Scorer.load(path)
        expected[reference.model.sha256[:12]] = (reference.score(score_request)["scores"],
                                                 reference.recommend(recommend_request)["items"])
    assert len(expected) == 2
    scorer = Scorer.load(live)
    stop = threading.Event()
    failures: list[str] = []
    counts = {"answers": 0, "reloads": 0, "rejected": 0, "swaps": 0}
    models_seen: set[str] = set()

    def serve_requests(port: int) -> None:
        conn = Conn(port)
        while not stop.is_set():
            for path, request in (("/score", score_request), ("/recommend", recommend_request)):
                status, answer = conn.post(path, json.dumps(request).encode())
                if status != 200 or answer["model"] not in expected:
                    failures.append(f"{path}: {status} {answer}")
                    continue
                scores, items = expected[answer["model"]]
                models_seen.add(answer["model"])
                if path == "/score" and not np.allclose(answer["scores"], scores, rtol=1e-5, atol=1e-5):
                    failures.append(f"/score from {answer['model']} mixes file sets: {answer['scores']} != {scores}")
                if path == "/recommend" and answer["items"] != items:
                    failures.append(f"/recommend from {answer['model']}: {answer['items']} != {items}")
                counts["answers"] += 1

    def reload_repeatedly(port: int) -> None:
        conn = Conn(port)
        while not stop.is_set():
            status, answer = conn.post("/admin/reload", b"")
            if status == 200:
                counts["reloads"] += 1
            elif status == 422 and answer["reloaded"] is False:
                counts["rejected"] += 1
            else:
                failures.append(f"/admin/reload: {status} {answer}")

    def replace_files() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            source = sets["ab"[counts["swaps"] % 2]].parent
            mode = rng.integers(3)
            for name in names:
                blob = (source / name).read_bytes()
                if mode == 0:  # atomic: temporary file, then rename
                    tmp = live.parent / f".{name}.tmp"
                    tmp.write_bytes(blob)
                    os.replace(tmp, live.parent / name)
                elif mode == 1:  # in place: readers can see it truncated or half written
                    with open(live.parent / name, "wb") as fh:
                        fh.write(blob[:len(blob) // 2])
                        fh.flush()
                        time.sleep(0.003)
                        fh.write(blob[len(blob) // 2:])
                else:  # missing for a moment
                    (live.parent / name).unlink()
                    time.sleep(0.003)
                    (live.parent / name).write_bytes(blob)
            counts["swaps"] += 1
            time.sleep(0.01)

    with serve_in_thread(scorer) as srv:
        threads = [threading.Thread(target=serve_requests, args=(srv.port,)) for _ in range(3)]
        threads += [threading.Thread(target=reload_repeatedly, args=(srv.port,)) for _ in range(4)]
        threads.append(threading.Thread(target=replace_files))
        for t in threads:
            t.start()
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # the files at rest are one complete set: a last reload takes it, and its answers agree
        status, answer = Conn(srv.port).post("/admin/reload", b"")
        assert status == 200 and answer["sha256"][:12] in expected
    assert failures == [], failures[:5]
    assert counts["answers"] > 100 and counts["reloads"] > 5 and counts["rejected"] > 0, counts
    assert models_seen == set(expected), (models_seen, counts)  # both sets were served, never a mixture
