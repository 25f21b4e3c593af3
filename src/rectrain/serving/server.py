"""The HTTP JSON service over a :class:`Scorer`: stdlib ``ThreadingHTTPServer``, torch-free.

Endpoints (JSON in and out; errors are ``{"error": reason, "status": code}``):

* ``POST /recommend``: one request object -> one answer; a JSON list of requests -> a list of answers
  (one graph call for the batch).
* ``POST /score``: one request object -> scores of its candidate items.
* ``GET /healthz``: ``{"status": "ok", "model": sha256, ...}``.
* ``GET /metadata``: the model's metadata (vocabularies summarised), limits and warnings.
* ``POST /admin/reload``: load the serving path again (after a new export was renamed onto it);
  200 with the new sha256, or 422 with the reason while the old model keeps serving. Also on SIGHUP
  when started from the CLI. Bind to 127.0.0.1 (the default) or put the service behind a proxy
  that does not expose ``/admin``.

Bad requests get a 4xx with the reason and never stop the service: malformed JSON or wrong types
400, body over the limit 413 (read and dropped up to 8x the limit, never parsed), no Content-Length
or a chunked body 411, unknown path 404, wrong method 405, a batch over ``max_batch`` 413. Anything
unexpected is a 500 with the exception's message; the next request is served normally.
"""
from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rectrain.serving.model import ModelLoadError
from rectrain.serving.scorer import RequestError, Scorer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
#: bodies up to this many times the limit are read and dropped before the 413 (see _read_json)
DRAIN_FACTOR = 8
ROUTES = {"/recommend": "POST", "/score": "POST", "/admin/reload": "POST", "/healthz": "GET", "/metadata": "GET"}


class ScoringServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the scorer and the request limits."""

    daemon_threads = True  # in-flight requests do not block shutdown
    request_queue_size = 128  # listen backlog: bursts of concurrent clients are queued, not refused
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], scorer: Scorer, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        super().__init__(address, Handler)
        self.scorer, self.max_body = scorer, max_body
        self.started = time.time()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    """One request: route, read a bounded JSON body, answer JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "rectrain-serving"
    timeout = 30  # seconds a client may take to send its request (slow clients cannot hold a thread forever)
    # headers and body go out in two writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK (~40 ms per answer on Linux loopback)
    disable_nagle_algorithm = True
    server: ScoringServer

    # --- plumbing -------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: Any) -> None:
        blob = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(blob)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", "") != "HEAD":
            self.wfile.write(blob)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, oversized headers, unknown method) as JSON too."""
        self.close_connection = True
        try:
            reason = message or HTTPStatus(code).phrase
        except ValueError:
            reason = f"error {code}"
        self._error(code, reason)

    def _error(self, status: int, reason: str) -> None:
        self._send(status, {"error": reason, "status": status})

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked bodies are not accepted; send Content-Length", 411)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError("Content-Length required", 411)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(f"invalid Content-Length {length_header!r}") from None
        if length > self.server.max_body:
            self.close_connection = True
            if length <= DRAIN_FACTOR * self.server.max_body:
                # read and drop the body: closing a socket with unread data sends a reset, and the
                # client could lose this answer (and its reason) before reading it
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            raise RequestError(f"body of {length} bytes exceeds the limit of {self.server.max_body} bytes", 413)
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(f"body ended after {len(body)} of {length} bytes")
        try:
            return json.loads(body)
        except UnicodeDecodeError as exc:
            raise RequestError(f"body is not UTF-8 text ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise RequestError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise RequestError("malformed JSON: nested too deeply") from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in ROUTES:
                raise RequestError(f"no such endpoint {path}; endpoints: {', '.join(sorted(ROUTES))}", 404)
            if ROUTES[path] != method:
                raise RequestError(f"{path} takes {ROUTES[path]}, not {method}", 405)
            status, body = getattr(self, "route_" + path.strip("/").replace("/", "_"))()
            self._send(status, body)
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # a bug must cost one request, not the service
            log.exception("error answering %s %s", method, path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    # --- endpoints ------------------------------------------------------------------------------
    def route_recommend(self) -> tuple[int, Any]:
        payload = self._read_json()
        if isinstance(payload, list):
            return 200, self.server.scorer.recommend_many(payload)
        if not isinstance(payload, dict):
            raise RequestError(f"expected a JSON object (or a list of them), got {type(payload).__name__}")
        return 200, self.server.scorer.recommend(payload)

    def route_score(self) -> tuple[int, Any]:
        payload = self._read_json()
        if not isinstance(payload, dict):
            raise RequestError(f"expected a JSON object, got {type(payload).__name__}")
        return 200, self.server.scorer.score(payload)

    def route_healthz(self) -> tuple[int, Any]:
        model = self.server.scorer.model
        return 200, {"status": "ok", "model": model.sha256, "file": str(model.path), "kind": model.kind,
                     "loaded_at": model.loaded_at, "uptime_s": round(time.time() - self.server.started, 3)}

    def route_metadata(self) -> tuple[int, Any]:
        return 200, self.server.scorer.describe()

    def route_admin_reload(self) -> tuple[int, Any]:
        if self.headers.get("Content-Length", "0").strip() != "0":
            self._read_json()  # drain (and check) the body so the connection stays usable; it is not used
        try:
            return 200, self.server.scorer.reload()
        except ModelLoadError as exc:
            model = self.server.scorer.model
            return 422, {"error": f"new model rejected, still serving the old one: {exc}", "status": 422,
                         "reloaded": False, "serving_sha256": model.sha256}


def make_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 8000, *,
                max_body: int = DEFAULT_MAX_BODY) -> ScoringServer:
    """A bound (not yet serving) server; port 0 picks a free port (see ``server.url``)."""
    return ScoringServer((host, port), scorer, max_body=max_body)
