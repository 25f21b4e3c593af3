"""The HTTP JSON service over a :class:`Scorer`: a Starlette (ASGI) app, run by uvicorn, torch-free.

Endpoints (JSON in and out; errors are ``{"error": reason, "status": code}``):

* ``POST /recommend``: one request object -> one answer; a JSON list of requests -> a list of answers
  (one graph call for the batch).
* ``POST /score``: one request object -> scores of its candidate items.
* ``GET /healthz``: ``{"status": "ok", "model": sha256, "file": file name, ...}``.
* ``GET /metadata``: the model's metadata (vocabularies summarised), limits and warnings.
* ``POST /admin/reload`` (empty body or ``{}``): load the serving file set again (after a new export
  was renamed onto it); 200 with the new sha256, or 422 with the reason while the old model keeps
  serving. Needs ``Authorization: Bearer <token>`` when the service has an admin token (401 without
  credentials, 403 with wrong ones); a service bound beyond loopback must have one.

Bad requests get a 4xx with the reason and never stop the service: anything the body or a field
cannot be (malformed JSON, not UTF-8, NaN/Infinity, numbers out of range, integers over 4300 digits,
lone surrogates, nesting too deep, wrong types) 400; POST without Content-Length or chunked framing
411; body over the limit 413 (refused on its Content-Length before it is read, or as soon as a
chunked body passes it; the connection is closed); body not received within the request timeout
408 (connection closed); unknown path 404; wrong method 405; a batch over ``max_batch`` 413.
Answers never carry a directory: files are named by their name. Anything unexpected is a 500 with
the exception's message (a bug: the request fuzz test asserts none occurs).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from rectrain.serving.auth import check_bearer
from rectrain.serving.guard import BodyGuard, ClosingRequestError
from rectrain.serving.jsonbody import parse_json
from rectrain.serving.model import ModelLoadError
from rectrain.serving.scorer import RequestError, Scorer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
ROUTES = {"/recommend": "POST", "/score": "POST", "/admin/reload": "POST", "/healthz": "GET", "/metadata": "GET"}


@dataclass
class ServiceLimits:
    """What one request may cost and how the service is reached (the CLI's flags)."""

    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body
    request_timeout: float = 30.0  # seconds for a request's headers, and again for its body
    keep_alive: int = 5  # seconds an idle keep-alive connection is kept
    max_connections: int = 256  # concurrent connections (and requests) per worker; beyond: 503
    workers: int = 1  # processes, one model each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def json_response(status: int, body: Any, *, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    """A compact UTF-8 JSON answer; a lone surrogate (in-process callers only) is written as its escape."""
    blob = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    extra = dict(headers or {})
    if close:
        extra["Connection"] = "close"
    return Response(blob.encode("utf-8", "backslashreplace"), status, headers=extra,
                    media_type="application/json; charset=utf-8")


def error_response(status: int, reason: str, *, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": reason, "status": status}, close=close, headers=headers)


async def _read_body(request: Request) -> bytes:
    headers = request.headers
    if "content-length" not in headers and "transfer-encoding" not in headers:
        raise ClosingRequestError("Content-Length required", 411)
    return await request.body()


class Service:
    """The endpoints over one scorer; ``workers`` > 1: a reload also restarts the sibling workers."""

    def __init__(self, scorer: Scorer, limits: ServiceLimits, admin_token: str | None) -> None:
        self.scorer, self.limits, self.admin_token = scorer, limits, admin_token
        self.started = time.time()

    async def _json_call(self, request: Request, handler: Callable[[Any], Any]) -> Response:
        body = await _read_body(request)
        # decoding, validation and the graph call run on the event loop: they take well under a
        # millisecond, and a hop to the thread pool per request cost a third of the throughput
        # (measured, bench/http_load.py); several cores are used through --workers instead
        return json_response(200, handler(parse_json(body)))

    def _recommend(self, payload: Any) -> Any:
        if isinstance(payload, list):
            return self.scorer.recommend_many(payload)
        if not isinstance(payload, dict):
            raise RequestError(f"expected a JSON object (or a list of them), got {type(payload).__name__}")
        return self.scorer.recommend(payload)

    def _score(self, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise RequestError(f"expected a JSON object, got {type(payload).__name__}")
        return self.scorer.score(payload)

    async def recommend(self, request: Request) -> Response:
        return await self._json_call(request, self._recommend)

    async def score(self, request: Request) -> Response:
        return await self._json_call(request, self._score)

    async def healthz(self, request: Request) -> Response:
        model = self.scorer.model
        return json_response(200, {"status": "ok", "model": model.sha256, "file": model.path.name,
                                   "kind": model.kind, "loaded_at": model.loaded_at,
                                   "uptime_s": round(time.time() - self.started, 3)})

    async def metadata(self, request: Request) -> Response:
        return json_response(200, {**self.scorer.describe(), "service": self.limits.to_dict()})

    async def admin_reload(self, request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), self.admin_token)
        body = await request.body()
        if body.strip() and parse_json(body) != {}:
            raise RequestError("/admin/reload takes no parameters: send an empty body or {}")
        try:
            info = await run_in_threadpool(self.scorer.reload)
        except ModelLoadError as exc:
            model = self.scorer.model
            return json_response(422, {"error": f"new model rejected, still serving the old one: {exc}",
                                       "status": 422, "reloaded": False, "serving_sha256": model.sha256})
        if self.limits.workers > 1:  # the supervisor re-checks the files and restarts every worker on them
            os.kill(os.getppid(), signal.SIGHUP)
            info["workers"] = f"restarting all {self.limits.workers} workers on the new files"
        return json_response(200, info)


# --- errors -----------------------------------------------------------------------------------------
async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, str(exc), close=isinstance(exc, ClosingRequestError), headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path, method = request.url.path, request.method
    if exc.status_code == 404:
        return error_response(404, f"no such endpoint {path}; endpoints: {', '.join(sorted(ROUTES))}")
    if exc.status_code == 405 and path in ROUTES:
        return error_response(405, f"{path} takes {ROUTES[path]}, not {method}", headers={"Allow": ROUTES[path]})
    return error_response(exc.status_code, str(exc.detail))


async def _disconnected(request: Request, exc: Exception) -> Response:
    return error_response(400, "client disconnected before sending the whole body", close=True)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("error answering %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(scorer: Scorer, limits: ServiceLimits | None = None, *, admin_token: str | None = None) -> Any:
    """The ASGI app: the endpoints, JSON errors, and the body size/time guard around them."""
    limits = limits or ServiceLimits()
    service = Service(scorer, limits, admin_token)
    routes = [Route(path, getattr(service, path.strip("/").replace("/", "_")), methods=[method])
              for path, method in ROUTES.items()]
    app = Starlette(routes=routes, exception_handlers={
        RequestError: _request_error, HTTPException: _http_error, ClientDisconnect: _disconnected,
        Exception: _internal_error})
    app.state.service = service
    return BodyGuard(app, max_body=limits.max_body, timeout=limits.request_timeout)
