"""Time and size bounds on what a client sends, so a slow or oversized request costs nothing lasting.

* :class:`BodyGuard` (ASGI middleware): a request's body must arrive within ``timeout`` seconds of
  its headers (else 408 and the connection is closed) and hold at most ``max_body`` bytes (else 413:
  refused on its Content-Length before any byte is read, or as soon as a streamed body passes the
  limit). Nothing beyond the limit is buffered; up to ``DRAIN_FACTOR`` times the limit is read and
  dropped first, because closing a socket with unread data sends a reset that can destroy the
  answer before the client reads it.
* :class:`HeaderDeadlineProtocol` (uvicorn's h11 protocol; ``HttpToolsDeadlineProtocol`` the same on
  httptools when installed): a connection must complete each
  request's headers within the same timeout, counted from its opening or from its previous answer;
  uvicorn itself waits forever for headers sent one byte at a time. The headers may also hold at
  most ``MAX_HEADER_BYTES`` (else 431 and the connection is closed): uvicorn's httptools protocol
  buffers header bytes without any limit (a client sent 90 MB of one header in 20 s).
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from rectrain.serving.scorer import RequestError

#: bodies up to this many times the limit are read and dropped before the 413
DRAIN_FACTOR = 8
#: the most bytes a request line plus headers may take (h11 is given the same limit)
MAX_HEADER_BYTES = 64 * 1024


class ClosingRequestError(RequestError):
    """A refusal after which the connection is closed (its body was not read to the end)."""


class BodyGuard:
    """ASGI middleware bounding each request body's size and arrival time (see the module docstring)."""

    def __init__(self, app: Any, *, max_body: int, timeout: float) -> None:
        self.app, self.max_body, self.timeout = app, max_body, timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        declared = _content_length(scope)
        state = {"received": 0, "refused": None}

        async def next_message() -> dict[str, Any]:
            try:
                if hasattr(asyncio, "timeout_at"):  # Python 3.11+: a timer, not a task per message (wait_for)
                    async with asyncio.timeout_at(deadline):
                        return await receive()
                return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (TimeoutError, asyncio.TimeoutError):
                raise ClosingRequestError(f"request body not received within {self.timeout:g} s", 408) from None

        async def drain() -> None:
            """Read and drop the rest of an oversized body (bounded, within the deadline)."""
            budget = DRAIN_FACTOR * self.max_body
            while state["received"] <= budget:
                message = await next_message()
                state["received"] += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return

        async def guarded_receive() -> dict[str, Any]:
            if state["refused"] is not None:
                raise state["refused"]
            if declared is not None and declared > self.max_body:
                state["refused"] = ClosingRequestError(
                    f"body of {declared} bytes exceeds the limit of {self.max_body} bytes", 413)
                if declared <= DRAIN_FACTOR * self.max_body:
                    await drain()
                raise state["refused"]
            message = await next_message()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    state["refused"] = ClosingRequestError(
                        f"body exceeds the limit of {self.max_body} bytes", 413)
                    if message.get("more_body", False):
                        await drain()
                    raise state["refused"]
            return message

        await self.app(scope, guarded_receive, send)


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # h11 already refuses malformed lengths
                return None
    return None


class _HeaderDeadline:
    """A deadline for each request's headers (``config.header_timeout``), mixed into uvicorn's protocols."""

    _deadline: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None
    _header_bytes = 0  # bytes received while the armed request's headers were incomplete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None and self._headers_pending():
            self._header_bytes += len(data)
        super().data_received(data)
        self._disarm_once_started()
        if self._deadline is not None and self._header_bytes > MAX_HEADER_BYTES:
            self._refuse_headers()

    def on_response_complete(self) -> None:
        self._arm()  # before: pipelined bytes may start the next request inside the call
        super().on_response_complete()
        self._disarm_once_started()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._cancel()
        self._header_bytes = 0
        self._armed_cycle = self.cycle
        timeout = float(getattr(self.config, "header_timeout", 30.0))
        self._deadline = self.loop.call_later(timeout, self._expire)

    def _headers_pending(self) -> bool:
        """True while no request is in progress: what arrives now is the next request's line and headers.

        (A pipelined request already parsed is in progress once its predecessor's answer is complete:
        its body's bytes are not header bytes, and its time is BodyGuard's.)
        """
        return self.cycle is self._armed_cycle and (self.cycle is None or self.cycle.response_complete)

    def _disarm_once_started(self) -> None:
        if self._deadline is not None and not self._headers_pending():
            self._cancel()  # the headers are in: the body's time is BodyGuard's

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse_headers(self) -> None:
        """431 and close: the headers passed MAX_HEADER_BYTES and are still incomplete."""
        self._cancel()
        if self.transport.is_closing():
            return
        body = (b'{"error":"request headers exceed the limit of %d bytes","status":431}' % MAX_HEADER_BYTES)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class HeaderDeadlineProtocol(_HeaderDeadline, H11Protocol):  # type: ignore[misc]
    """uvicorn's pure-Python h11 protocol with the header deadline."""


try:  # httptools: uvicorn's C parser (the ``uvicorn[standard]`` extra), about twice h11's speed
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpToolsDeadlineProtocol(_HeaderDeadline, HttpToolsProtocol):  # type: ignore[misc]
        """uvicorn's httptools protocol with the header deadline."""

except ImportError:  # pragma: no cover - depends on the environment
    HttpToolsDeadlineProtocol = None  # type: ignore[assignment,misc]


def http_protocol() -> type:
    """The httptools protocol when installed, else h11; both with the header deadline."""
    return HttpToolsDeadlineProtocol or HeaderDeadlineProtocol
