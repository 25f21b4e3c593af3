"""Torch-free serving: the Scorer's rules, the HTTP service under bad requests and reloads, the CLI,
and the end-to-end path train -> export -> serve over HTTP -> the same top-K as PyTorch."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rectrain.serving import ModelLoadError, RequestError, Scorer, ServiceLimits, serve_in_thread
from tests.test_export_fixtures import (
    ROOT,
    assert_same_topk,
    item_ids,
    load_net,
    torch_topk,
    validation_queries,
)

# the session fixtures `checkpoints` and `exports` (tiny trained models and their exports)
pytest_plugins = ["tests.test_export_fixtures"]

PYTHON = sys.executable


@pytest.fixture(scope="module")
def tt(exports) -> Scorer:
    return Scorer.load(exports["two_tower"], max_k=50)


@pytest.fixture(scope="module")
def ncf(exports) -> Scorer:
    return Scorer.load(exports["neumf"])


def _copy_export(src: Path, dest: Path) -> Path:
    """Copy an export (main file + companions + sidecar) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = src.name.removesuffix(".onnx")
    for f in src.parent.glob(f"{stem}.*"):
        shutil.copy2(f, dest / f.name)
    return dest / src.name


class Client:
    """A tiny JSON client for the tests (one connection per request)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port, self.token = port, token
        self.last_headers: dict[str, str] = {}

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            headers = dict(headers or {})
            if self.token and path.startswith("/admin"):
                headers.setdefault("Authorization", f"Bearer {self.token}")
            if data is None and method == "POST":
                headers.setdefault("Content-Length", "0")
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            self.last_headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()


@pytest.fixture
def server(tt):
    srv = serve_in_thread(tt, limits=ServiceLimits(max_body=64 * 1024))
    yield Client(srv.port)
    srv.stop()


def _raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


# --- the Scorer's rules -------------------------------------------------------------------------
def test_unknown_items_are_skipped_and_reported(tt):
    vocab = tt.model.item_vocab
    plain = tt.recommend(history=[vocab[3], vocab[5]], k=5)
    noisy = tt.recommend(history=["nope", vocab[3], 123456789, vocab[5]], k=5)
    assert noisy["unknown_items"] == ["nope", "123456789"] and plain["unknown_items"] == []
    assert noisy["items"] == plain["items"] and noisy["scores"] == plain["scores"]
    assert noisy["cold_start"] is False and len(noisy["items"]) == 5


def test_cold_start_uses_popularity_and_says_so(tt):
    popularity = tt.model.popularity
    for history, reason in (([], "empty history"), (["nope", "nada"], "no known item in the history")):
        answer = tt.recommend(history=history, k=4, exclude=[tt.model.item_vocab[int(np.argmax(popularity))]])
        assert answer["cold_start"] is True and answer["cold_start_reason"] == reason
        order = [tt.model.item_vocab[i] for i in np.lexsort((np.arange(len(popularity)), -popularity))]
        assert answer["items"] == order[1:5]  # the most popular item was excluded
        assert answer["scores"] == sorted(answer["scores"], reverse=True)


def test_excluded_and_seen_items_never_come_back(tt):
    vocab = tt.model.item_vocab
    history = vocab[:6]
    everything = tt.recommend(history=history, k=50, exclude_seen=False)
    banned = everything["items"][:3]
    answer = tt.recommend(history=history, k=50, exclude=banned)  # exclude_seen defaults to mask_seen (true)
    assert tt.model.mask_seen is True
    assert not set(answer["items"]) & (set(banned) | set(history))
    assert len(answer["items"]) == 50
    # a catalog exhausted by exclusions gives a shorter list, never an excluded item
    almost_all = vocab[:-2]
    short = tt.recommend(history=[vocab[0]], k=50, exclude=almost_all)
    assert sorted(short["items"]) == sorted(vocab[-2:])


def test_long_histories_are_cut_to_the_most_recent_items(tt):
    vocab = tt.model.item_vocab
    max_length = tt.model.max_length
    long = [vocab[i % len(vocab)] for i in range(max_length + 7)]
    cut = tt.recommend(history=long, k=10, exclude_seen=False)
    tail = tt.recommend(history=long[-max_length:], k=10, exclude_seen=False)
    assert cut["truncated"] == 7 and tail["truncated"] == 0
    assert cut["items"] == tail["items"]


@pytest.mark.parametrize("request_, message", [
    ({"history": "a b"}, "'history' must be a list"),
    ({"history": [1.5]}, "'history[0]' must be a string or integer id"),
    ({"history": [True]}, "'history[0]' must be a string or integer id"),
    ({"history": [], "k": "10"}, "'k' must be an integer"),
    ({"history": [], "k": 2.0}, "'k' must be an integer"),
    ({"history": [], "k": 0}, "'k' must be between 1 and 50"),
    ({"history": [], "k": -3}, "'k' must be between 1 and 50"),
    ({"history": [], "k": 10**12}, "'k' must be between 1 and 50"),
    ({"history": [], "exclude_seen": "yes"}, "'exclude_seen' must be true or false"),
    ({"history": [], "exclude": {"a": 1}}, "'exclude' must be a list"),
    ({"k": 3}, "missing field 'history'"),
    ({"history": [], "user": "u1"}, "unknown field 'user'"),
    ({"history": [], "id": [1]}, "'id' must be a string or integer"),
])
def test_bad_requests_raise_with_the_reason(tt, request_, message):
    with pytest.raises(RequestError, match=__import__("re").escape(message)) as info:
        tt.recommend(request_)
    assert info.value.status == 400


def test_batches_answer_like_single_requests(tt):
    vocab = tt.model.item_vocab
    requests = [{"history": vocab[i:i + 1 + i % 5], "k": 3 + i, "id": i} for i in range(6)] + [{"history": []}]
    batch = tt.recommend_many(requests)
    for request, answer in zip(requests, batch):
        single = tt.recommend(request)
        assert answer["items"] == single["items"] and answer.get("id") == request.get("id")
        np.testing.assert_allclose(answer["scores"], single["scores"], rtol=1e-5, atol=1e-6)
    with pytest.raises(RequestError, match=r"requests\[1\]: 'k' must be"):
        tt.recommend_many([{"history": []}, {"history": [], "k": -1}])


def test_score_agrees_with_recommend(tt, ncf):
    vocab = tt.model.item_vocab
    top = tt.recommend(history=vocab[2:5], k=5)
    scored = tt.score(history=vocab[2:5], items=top["items"] + ["unknown"])
    assert scored["items"] == top["items"] and scored["unknown_items"] == ["unknown"]
    np.testing.assert_allclose(scored["scores"], top["scores"], rtol=1e-5, atol=1e-5)
    # history items too: /score adds the same repeat bonus the recommend graph does (run here whole)
    assert tt.model.repeat_bonus is not None
    history = vocab[2:5] + [vocab[3]]
    scored = tt.score(history=history, items=vocab)
    idx = np.array([tt.model.item_index[h] for h in history], dtype=np.int64)
    items, scores = tt.model.session.run(None, {"history": idx[None], "lengths": np.array([len(idx)]),
                                                "exclude": np.zeros((1, 0), np.int64), "k": np.array(len(vocab))})
    graph = np.empty(len(vocab), np.float32)
    graph[items[0]] = scores[0]
    np.testing.assert_allclose(scored["scores"], graph, rtol=1e-5, atol=1e-5)
    user = next(iter(ncf.model.user_index))
    top = ncf.recommend(user=user, k=5)
    scored = ncf.score(user=user, items=top["items"])
    np.testing.assert_allclose(scored["scores"], top["scores"], rtol=1e-5, atol=1e-5)


def test_ncf_users_known_unknown_and_without_sidecar(ncf, exports, tmp_path):
    user = next(iter(ncf.model.user_index))
    assert ncf.recommend(user=user, k=3)["cold_start"] is False
    unknown = ncf.recommend(user="somebody new", k=3)
    assert unknown["cold_start"] is True and unknown["cold_start_reason"] == "unknown user"
    # a model shared without its user vocabulary still serves (everyone cold start) and says why
    path = _copy_export(exports["neumf"], tmp_path / "shared")
    (path.parent / "neumf.user_vocab.json").unlink()
    shared = Scorer.load(path)
    assert any("user vocabulary" in w for w in shared.model.warnings)
    assert shared.recommend(user=user, k=3)["cold_start_reason"] == "user vocabulary not loaded"
    # ... but a sidecar that is not the one the model pins is refused
    (path.parent / "neumf.user_vocab.json").write_text('{"user_vocab": ["x"]}')
    with pytest.raises(ModelLoadError, match="sha256"):
        Scorer.load(path)


def test_companion_graphs_missing_or_mismatched(exports, tmp_path):
    path = _copy_export(exports["two_tower"], tmp_path / "partial")
    (path.parent / "two_tower.query.onnx").unlink()
    partial = Scorer.load(path)  # recommending needs only the main file
    assert any("/score is unavailable" in w for w in partial.model.warnings)
    assert partial.recommend(history=partial.model.item_vocab[:2], k=3)["cold_start"] is False
    with pytest.raises(RequestError, match="without its score graph") as info:
        partial.score(history=partial.model.item_vocab[:2], items=partial.model.item_vocab[:2])
    assert info.value.status == 501
    # a companion from another export is refused outright: the files must belong together
    shutil.copy(exports["two_tower"].with_name("two_tower.int8.onnx"), path.parent / "two_tower.query.onnx")
    with pytest.raises(ModelLoadError, match="different exports"):
        Scorer.load(path)


def test_broken_or_foreign_files_are_refused(exports, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        Scorer.load(garbage)
    with pytest.raises(ModelLoadError, match="cannot read"):
        Scorer.load(tmp_path / "missing.onnx")
    companion = exports["two_tower"].with_name("two_tower.query.onnx")
    with pytest.raises(ModelLoadError, match="serve the main"):
        Scorer.load(companion)


# --- torch stays out ------------------------------------------------------------------------------
def test_serving_never_imports_torch(exports):
    code = (
        "import sys, serve_onnx\n"
        "from rectrain.serving import Scorer\n"
        f"s = Scorer.load({str(exports['two_tower'])!r})\n"
        "s.recommend(history=s.model.item_vocab[:3], k=5); s.score(history=[], items=s.model.item_vocab[:2])\n"
        f"n = Scorer.load({str(exports['neumf'])!r})\n"
        "n.recommend(user=next(iter(n.model.user_index)), k=5)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytorch_lightning', 'lightning', "
        "'hydra', 'onnx', 'pandas'))\n"
        "print('HEAVY', heavy)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


# --- HTTP -----------------------------------------------------------------------------------------
def test_http_answers_and_endpoints(server, tt):
    vocab = tt.model.item_vocab
    status, body = server.request("POST", "/recommend", {"history": vocab[:3], "k": 4, "id": "r1"})
    assert status == 200 and body["id"] == "r1" and body["items"] == tt.recommend(history=vocab[:3], k=4)["items"]
    status, body = server.request("POST", "/recommend", [{"history": vocab[:2]}, {"history": []}])
    assert status == 200 and [b["cold_start"] for b in body] == [False, True]
    status, body = server.request("POST", "/score", {"history": vocab[:2], "items": vocab[5:8]})
    assert status == 200 and body["items"] == vocab[5:8] and len(body["scores"]) == 3
    status, body = server.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["model"] == tt.model.sha256
    status, body = server.request("GET", "/metadata")
    assert status == 200 and body["model_kind"] == "two_tower" and body["max_length"] == "20"
    assert [i["name"] for i in body["inputs"]] == ["history", "lengths", "exclude", "k"]
    assert body["limits"]["max_k"] == 50 and body["item_vocab"].startswith("<")


@pytest.mark.parametrize("method, path, kwargs, status, reason", [
    ("POST", "/recommend", {"raw": b'{"history": ['}, 400, "malformed JSON"),
    ("POST", "/recommend", {"raw": b"\xff\xfe\x00"}, 400, "malformed JSON|not UTF-8"),
    ("POST", "/recommend", {"raw": b"[" * 20_000}, 400, "malformed JSON"),
    ("POST", "/recommend", {"body": "just a string"}, 400, "expected a JSON object"),
    ("POST", "/recommend", {"body": {"history": [], "k": "5"}}, 400, "'k' must be an integer"),
    ("POST", "/recommend", {"body": {"history": [], "k": -1}}, 400, "'k' must be between 1 and 50"),
    ("POST", "/recommend", {"body": {"history": [], "k": 51}}, 400, "'k' must be between 1 and 50"),
    ("POST", "/recommend", {"body": {"history": [{"id": 1}]}}, 400, "must be a string or integer id"),
    ("POST", "/recommend", {"body": {"histroy": []}}, 400, "unknown field 'histroy'"),
    ("POST", "/recommend", {"body": []}, 400, "non-empty list"),
    ("POST", "/recommend", {"raw": b'{"history": ["' + b"x" * 300_000 + b'"]}'}, 413, "exceeds the limit"),
    # the reported inputs: Python's int-string limit and a lone surrogate (both answered 500 before)
    ("POST", "/recommend", {"raw": b'{"history": [], "k": ' + b"9" * 5000 + b"}"}, 400, "integer of 5000 digits"),
    ("POST", "/recommend", {"raw": b'{"history": [' + b"7" * 5000 + b"]}"}, 400, "integer of 5000 digits"),
    ("POST", "/recommend", {"raw": b'{"history": ["\\ud800"]}'}, 400, "lone surrogate"),
    ("POST", "/recommend", {"raw": b'{"history": [], "id": "\\udfff"}'}, 400, "lone surrogate"),
    ("POST", "/recommend", {"raw": b'{"\\ud800": 1}'}, 400, "lone surrogate"),
    ("POST", "/recommend", {"raw": b'{"history": [], "k": NaN}'}, 400, "NaN is not a JSON number"),
    ("POST", "/recommend", {"raw": b'{"history": [], "k": 1e999}'}, 400, "out of range"),
    ("POST", "/score", {"raw": b'{"history": [], "items": [' + b"1" * 4400 + b"]}"}, 400, "integer of 4400 digits"),
    ("POST", "/admin/reload", {"body": {"path": "/etc/passwd"}}, 400, "takes no parameters"),
    ("POST", "/score", {"body": {"history": []}}, 400, "missing field 'items'"),
    ("GET", "/recommend", {}, 405, "takes POST"),
    ("GET", "/nope", {}, 404, "no such endpoint"),
    ("DELETE", "/healthz", {}, 405, "takes GET"),
])
def test_http_bad_requests_get_4xx_and_the_service_keeps_serving(server, method, path, kwargs, status, reason):
    got, body = server.request(method, path, **kwargs)
    assert got == status and body["status"] == status
    assert __import__("re").search(reason, body["error"]), body["error"]
    assert server.request("POST", "/recommend", {"history": []})[0] == 200


def test_http_unknown_methods_are_json_405(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("PATCH", "/recommend")
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert json.loads(response.read()) == {"error": "/recommend takes POST, not PATCH", "status": 405}
    conn.close()
    assert server.request("GET", "/healthz")[0] == 200


def test_http_missing_content_length_is_411(server):
    reply = _raw_exchange(server.port, b"POST /recommend HTTP/1.1\r\nHost: x\r\n\r\n").decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length required" in reply


def test_http_chunked_bodies_within_the_limit_are_read_and_beyond_it_refused(server, tt):
    body = json.dumps({"history": tt.model.item_vocab[:3], "k": 2}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    reply = _raw_exchange(server.port, b"POST /recommend HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert reply.startswith(b"HTTP/1.1 200") and b'"items":' in reply
    block = b"x" * 16_000
    huge = b"".join(b"%x\r\n%s\r\n" % (len(block), block) for _ in range(6)) + b"0\r\n\r\n"  # 96 kB > 64 KiB
    reply = _raw_exchange(server.port, b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + huge)
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 65536 bytes" in reply


def test_reload_swaps_good_files_and_rejects_broken_ones(exports, tmp_path):
    path = _copy_export(exports["two_tower"], tmp_path / "live")
    scorer = Scorer.load(path)
    srv = serve_in_thread(scorer)
    client = Client(srv.port)
    try:
        old_sha = scorer.model.sha256
        history = {"history": scorer.model.item_vocab[:4], "k": 5}
        expected = client.request("POST", "/recommend", history)[1]["items"]

        # requests keep flowing while files change and reloads happen
        errors: list[object] = []

        def hammer() -> None:
            for _ in range(30):
                status, body = client.request("POST", "/recommend", history)
                if status != 200:
                    errors.append(body)

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        # a broken file is rejected; the old model keeps serving
        path.write_bytes(b"\x08\x01garbage")
        status, body = client.request("POST", "/admin/reload")
        assert status == 422 and body["reloaded"] is False and "still serving" in body["error"]
        assert body["serving_sha256"] == old_sha
        # a model of another kind is rejected too (the request format would change)
        shutil.copy(exports["neumf"], path)
        status, body = client.request("POST", "/admin/reload")
        assert status == 422 and "cannot replace" in body["error"]
        # a valid new file (here the int8 variant of the same model) is swapped in atomically
        shutil.copy(exports["two_tower"].with_name("two_tower.int8.onnx"), path)
        status, body = client.request("POST", "/admin/reload")
        assert status == 200 and body["reloaded"] is True and body["previous_sha256"] == old_sha
        for w in workers:
            w.join()
        assert errors == []
        status, body = client.request("GET", "/healthz")
        assert body["model"] != old_sha and body["model"] == scorer.model.sha256
        assert len(client.request("POST", "/recommend", history)[1]["items"]) == len(expected)
    finally:
        srv.stop()


# --- the command line -----------------------------------------------------------------------------
def test_batch_cli_jsonl_and_csv(tt, exports, tmp_path):
    vocab = tt.model.item_vocab
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps({"id": "a", "history": vocab[:3], "k": 3}),
        "{not json",
        json.dumps({"id": "b", "history": ["unknown"], "k": 2}),
        json.dumps({"id": "c", "history": [], "k": -1}),
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    result = subprocess.run([PYTHON, "serve_onnx.py", "batch", str(exports["two_tower"]), str(requests), "-o", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # some lines rejected
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 4]
    assert answers[0]["items"] == tt.recommend(history=vocab[:3], k=3)["items"] and answers[0]["id"] == "a"
    assert "malformed JSON" in answers[1]["error"]
    assert answers[2]["cold_start"] is True and answers[2]["unknown_items"] == ["unknown"]
    assert "'k' must be between" in answers[3]["error"]
    assert "2 of 4 requests answered, 2 rejected" in result.stderr

    csv_in = tmp_path / "requests.csv"
    csv_in.write_text("id,history,k,exclude\nx1," + " ".join(vocab[:3]) + ",4," + vocab[10] + "\nx2,,2,\n")
    result = subprocess.run([PYTHON, "serve_onnx.py", "batch", str(exports["two_tower"]), str(csv_in)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers[0]["items"] == tt.recommend(history=vocab[:3], k=4, exclude=[vocab[10]])["items"]
    assert answers[1]["cold_start"] is True and len(answers[1]["items"]) == 2

    result = subprocess.run([PYTHON, "serve_onnx.py", "batch", str(tmp_path / "missing.onnx"), str(csv_in)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot read" in result.stderr


def _start_service(model: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([PYTHON, "serve_onnx.py", "serve", str(model), "--port", "0", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line + proc.stderr.read()
    return proc, int(line.rsplit(":", 1)[1])


@pytest.mark.slow
def test_end_to_end_train_export_serve_matches_torch(checkpoints, exports, tmp_path):
    """Trained checkpoint -> export -> HTTP service in its own process -> the torch model's top-K."""
    net, facts = load_net(checkpoints["two_tower"])
    queries = validation_queries(checkpoints["two_tower"])
    live = _copy_export(exports["two_tower"], tmp_path / "tt")
    proc, port = _start_service(live)
    client = Client(port)
    try:
        rows = np.arange(min(40, len(queries)))
        max_length = int(facts["model_config"]["max_length"])
        for row in rows:
            history = queries.history_items[queries.history_indptr[row]:queries.history_indptr[row + 1]][-max_length:]
            status, answer = client.request("POST", "/recommend", {"history": item_ids(facts, history), "k": 10})
            assert status == 200 and answer["cold_start"] is False
            with torch.no_grad():
                full = net(torch.from_numpy(history)[None, :], torch.tensor([len(history)]))  # (1, I)
            seen = sorted(set(history.tolist()))  # mask_seen: the history is excluded by default
            want, _ = torch_topk(full, [seen], 10)
            got = [int(np.flatnonzero(np.array(facts["item_vocab"]) == raw)[0]) for raw in answer["items"]]
            assert_same_topk(got, want[0], full[0].numpy())
            np.testing.assert_allclose(answer["scores"], full[0].numpy()[got], rtol=1e-5, atol=1e-5)
        # SIGHUP reloads (here: the same file again, so only the load time changes), SIGTERM stops cleanly
        loaded_at = client.request("GET", "/healthz")[1]["loaded_at"]
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while client.request("GET", "/healthz")[1]["loaded_at"] == loaded_at:
            assert time.monotonic() < deadline, "SIGHUP did not reload the model"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert "reloaded" in proc.stderr.read()


@pytest.mark.slow
def test_end_to_end_ncf_over_http_matches_torch(checkpoints, exports):
    net, facts = load_net(checkpoints["neumf"])
    users = json.loads(exports["neumf"].with_name("neumf.user_vocab.json").read_text())["user_vocab"]
    proc, port = _start_service(exports["neumf"])
    client = Client(port)
    try:
        for index in range(0, len(users), 17):
            exclude = list(range(index % 5, facts["n_items"], 9))
            status, answer = client.request("POST", "/recommend", {"user": users[index], "k": 8,
                                                                   "exclude": item_ids(facts, exclude)})
            assert status == 200 and answer["cold_start"] is False
            with torch.no_grad():
                full = net.score_all(torch.tensor([index]))
            want, _ = torch_topk(full, [exclude], 8)
            got = [facts["item_vocab"].index(raw) for raw in answer["items"]]
            assert_same_topk(got, want[0], full[0].numpy())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


# --- regressions of issue #13 ("every fault survived") -----------------------------------------------
def test_reload_refuses_a_set_missing_a_companion_and_keeps_serving(exports, tmp_path):
    """Deleting tt.item_vectors.onnx used to reload with 200, then /score answered 501."""
    path = _copy_export(exports["two_tower"], tmp_path / "live")
    scorer = Scorer.load(path)
    vocab = scorer.model.item_vocab
    with serve_in_thread(scorer) as srv:
        client = Client(srv.port)
        (path.parent / "two_tower.item_vectors.onnx").unlink()
        status, body = client.request("POST", "/admin/reload")
        assert status == 422 and "two_tower.item_vectors.onnx" in body["error"] and body["reloaded"] is False
        assert str(tmp_path) not in json.dumps(body)  # file names only, never directories
        status, body = client.request("POST", "/score", {"history": vocab[:2], "items": vocab[3:6]})
        assert status == 200 and len(body["scores"]) == 3
        # a companion from another export (sha256 not the pinned one) is refused the same way
        shutil.copy(exports["two_tower"].with_name("two_tower.query.onnx"), path.parent / "two_tower.item_vectors.onnx")
        status, body = client.request("POST", "/admin/reload")
        assert status == 422 and "different exports" in body["error"]
        assert client.request("POST", "/score", {"history": vocab[:2], "items": vocab[3:6]})[0] == 200


def test_http_answers_name_no_directory_and_no_server_version(server, tt):
    status, body = server.request("GET", "/healthz")
    assert status == 200 and body["file"] == tt.model.path.name
    assert "server" not in server.last_headers and "date" in server.last_headers
    status, body = server.request("GET", "/metadata")
    assert status == 200 and str(tt.model.path.parent) not in json.dumps(body)
    assert body["file"] == tt.model.path.name and body["service"]["max_body"] == 64 * 1024


def test_admin_reload_needs_the_token_when_one_is_set(tt):
    with serve_in_thread(tt, admin_token="s3cret") as srv:
        client = Client(srv.port)
        status, body = client.request("POST", "/admin/reload")
        assert status == 401 and "Bearer" in body["error"] and client.last_headers["www-authenticate"] == "Bearer"
        status, body = client.request("POST", "/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert status == 403 and body == {"error": "wrong admin token", "status": 403}
        status, body = client.request("POST", "/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["reloaded"] is True
        assert client.request("POST", "/recommend", {"history": []})[0] == 200  # other endpoints need none


def test_cli_refuses_a_public_bind_without_a_token(exports):
    env = {k: v for k, v in os.environ.items() if k != "RECTRAIN_ADMIN_TOKEN"}
    result = subprocess.run([PYTHON, "serve_onnx.py", "serve", str(exports["two_tower"]), "--host", "0.0.0.0",
                             "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "--admin-token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_connections_beyond_the_limit_are_refused_with_503(tt):
    """1,000 held connections used to cost 1,003 threads: now a cap, and 503 beyond it."""
    with serve_in_thread(tt, limits=ServiceLimits(max_connections=4)) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(6)]
        try:
            time.sleep(0.2)
            status = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            status.request("GET", "/healthz")
            assert status.getresponse().status == 503
            status.close()
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert Client(srv.port).request("GET", "/healthz")[0] == 200


def test_trickling_bodies_and_headers_are_cut_off(tt):
    """A client sending one byte every few seconds used to hold its thread indefinitely."""
    with serve_in_thread(tt, limits=ServiceLimits(request_timeout=1.0)) as srv:
        # the body: 408 once the request timeout has passed, then the connection is closed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            start = time.monotonic()
            reply = b""
            try:
                while True:
                    sock.sendall(b" ")
                    time.sleep(0.2)
                    sock.setblocking(False)
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        chunk = None
                    sock.setblocking(True)
                    if chunk == b"":
                        break
                    reply += chunk or b""
                    assert time.monotonic() - start < 5, "the trickling body was not cut off"
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert reply.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in reply
        # the headers: the connection is closed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            start = time.monotonic()
            closed = False
            try:
                for byte in b"POST /recommend HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxx":
                    sock.sendall(bytes([byte]))
                    time.sleep(0.2)
                    if time.monotonic() - start > 5:
                        break
                sock.settimeout(3)
                closed = sock.recv(10) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            assert closed and time.monotonic() - start < 5
        assert Client(srv.port).request("GET", "/healthz")[0] == 200


def test_batch_cli_answers_every_bad_line_and_goes_on(tt, exports, tmp_path):
    """A 5,000-digit integer, a lone surrogate or undecodable bytes used to abort the whole input."""
    vocab = tt.model.item_vocab
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join([
        json.dumps({"id": "a", "history": vocab[:2], "k": 2}).encode(),
        b'{"history": [], "k": ' + b"9" * 5000 + b"}",
        b'{"history": ["\\ud800"]}',
        b"\xff\xfe not utf-8",
        b'{"history": [' + b"1" * 5000 + b"]}",
        json.dumps({"id": "b", "history": []}).encode(),
    ]) + b"\n")
    out = tmp_path / "answers.jsonl"
    out.write_text("previous answers\n")
    result = subprocess.run([PYTHON, "serve_onnx.py", "batch", str(exports["two_tower"]), str(requests), "-o", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "2 of 6 requests answered, 4 rejected" in result.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 4, 5, 6]
    assert answers[0]["id"] == "a" and answers[5]["id"] == "b" and answers[5]["cold_start"] is True
    assert "integer of 5000 digits" in answers[1]["error"] and "lone surrogate" in answers[2]["error"]
    assert "not UTF-8" in answers[3]["error"] and "integer of 5000 digits" in answers[4]["error"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written under a temporary name
    csv_in = tmp_path / "requests.csv"
    csv_in.write_bytes(b"history,k\n" + vocab[0].encode() + b"," + b"9" * 5000 + b"\n\xff,2\n,3\n")
    result = subprocess.run([PYTHON, "serve_onnx.py", "batch", str(exports["two_tower"]), str(csv_in)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and len(answers) == 3 and "1 of 3 requests answered" in result.stderr
    assert "'k' must be an integer" in answers[0]["error"] and "not UTF-8" in answers[1]["error"]
    assert len(answers[2]["items"]) == 3


def test_oversized_headers_are_refused_and_pipelined_bodies_are_not_mistaken_for_headers(tt):
    """httptools buffered header bytes without limit (90 MB of one header in 20 s): now 431 past 64 KiB."""
    with serve_in_thread(tt, limits=ServiceLimits(request_timeout=10.0)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            start = time.monotonic()
            reply = b""
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 1024))
                while chunk := sock.recv(65536):
                    reply += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while the rest of the oversized headers was still on its way
            elapsed = time.monotonic() - start
        assert elapsed < 5, "oversized headers were buffered until the header deadline"
        assert reply == b"" or (reply.startswith(b"HTTP/1.1 431") and b"exceed the limit" in reply)
        # headers below the limit, and a pipelined request's large body after another request, are fine
        assert Client(srv.port).request("GET", "/healthz", headers={"X-Big": "a" * 40_000})[0] == 200
        body = json.dumps({"history": [], "k": 2, "id": "x" * (200 * 1024)}).encode()
        pipelined = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /recommend HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        statuses = re.findall(rb"HTTP/1\.1 (\d+)", _raw_exchange(srv.port, pipelined))
        assert statuses == [b"200", b"200"], statuses


@pytest.mark.parametrize("flags, reason", [
    (["--request-timeout", "nan"], "--request-timeout must be a finite"),  # nan closed every connection at once
    (["--request-timeout", "inf"], "--request-timeout must be a finite"),  # inf: no trickle cut-off at all
    (["--max-k", "0"], "--max-k must be positive"),  # every request would be refused
    (["--max-batch", "-1"], "--max-batch must be positive"),
    (["--admin-token", ""], "--admin-token is empty"),  # reload left open although a token was meant
    (["--admin-token", "  "], "whitespace"),  # accepted, then no header could ever match it
    (["--admin-token", "s3cret\n"], "whitespace"),
])
def test_cli_refuses_flags_that_cannot_work(exports, flags, reason):
    env = {k: v for k, v in os.environ.items() if k != "RECTRAIN_ADMIN_TOKEN"}
    try:  # in a subprocess: before the checks, some of these served forever
        result = subprocess.run([PYTHON, "serve_onnx.py", "serve", str(exports["two_tower"]), "--port", "0", *flags],
                                cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve_onnx.py started serving with {flags}")
    assert result.returncode == 2 and reason in result.stderr, result.stderr[-500:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_log_level_in_any_case_and_batch_flags(exports, tmp_path, capsys):
    """``--log-level debug`` ended in a ValueError traceback from logging.basicConfig."""
    from rectrain.serving.cli import build_parser, main

    assert build_parser().parse_args(["serve", "m.onnx", "--log-level", "debug"]).log_level == "DEBUG"
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"history": []}\n')
    for flags in (["--max-k", "0"], ["--batch-size", "0"]):
        assert main(["batch", str(exports["two_tower"]), str(requests), *flags]) == 2
        assert "must be positive" in capsys.readouterr().err


def test_batch_cli_reads_a_csv_with_a_byte_order_mark(tt, exports, tmp_path, capsys):
    """Spreadsheet CSVs start with a UTF-8 BOM: every line was refused with "unknown field '\\ufeffhistory'"."""
    from rectrain.serving.cli import main

    vocab = tt.model.item_vocab
    csv_in = tmp_path / "requests.csv"
    csv_in.write_bytes(b"\xef\xbb\xbfhistory,k\r\n" + f"{vocab[0]} {vocab[1]},2\r\n,3\r\n".encode())
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(exports["two_tower"]), str(csv_in), "-o", str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(a["items"]) for a in answers] == [2, 3] and "error" not in answers[0]
    # an output path that is a directory: the message names it, not the temporary beside it
    assert main(["batch", str(exports["two_tower"]), str(csv_in), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"({tmp_path})" in err and "rectrain-tmp" not in err
    assert not [p for p in tmp_path.parent.iterdir() if "rectrain-tmp" in p.name]
