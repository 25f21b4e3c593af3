"""Running the ASGI service under uvicorn: in a thread (tests, embedding), or as the CLI's process(es).

uvicorn settings that matter here: the httptools protocol (h11 without it) with a header deadline
(:mod:`rectrain.serving.guard`), ``limit_concurrency`` (connections beyond it are answered 503:
a deliberate refusal under overload, not an error), ``timeout_keep_alive``, no ``Server`` header
(it named the Python version), no access log (one line per request halves throughput on two cores).

Several workers (``--workers N``) are uvicorn's supervisor with N processes sharing the socket, each
loading the model itself from :func:`app_from_env` (the settings travel in ``RECTRAIN_SERVE_CONFIG``,
the token in ``RECTRAIN_ADMIN_TOKEN``). SIGHUP to the supervisor first loads and checks the new file
set in the supervisor; only a set that passes replaces the workers, one at a time, each new one
serving before the old one leaves (uvicorn keeps the old worker when a new one fails to start).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

from rectrain.serving.auth import admin_token
from rectrain.serving.guard import MAX_HEADER_BYTES, http_protocol
from rectrain.serving.model import ModelLoadError
from rectrain.serving.scorer import Scorer
from rectrain.serving.server import ServiceLimits, create_app

log = logging.getLogger("rectrain.serving")

CONFIG_ENV = "RECTRAIN_SERVE_CONFIG"


def uvicorn_config(app: Any, host: str, port: int, limits: ServiceLimits, *, factory: bool = False,
                   log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's settings for this service (see the module docstring)."""
    config = uvicorn.Config(app, host=host, port=port, factory=factory, http=http_protocol(), ws="none",
                            lifespan="off", loop="asyncio", server_header=False, access_log=False,
                            log_config=None, log_level=log_level.lower(), timeout_keep_alive=limits.keep_alive,
                            limit_concurrency=limits.max_connections, workers=limits.workers,
                            timeout_graceful_shutdown=10, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    config.header_timeout = limits.request_timeout  # type: ignore[attr-defined]  (read by the protocol)
    return config


class RunningServer:
    """A uvicorn server on its own thread and event loop; ``stop()`` ends it (tests, notebooks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, limits: ServiceLimits | None = None) -> None:
        config = uvicorn_config(app, host, port, limits or ServiceLimits())
        self.socket = config.bind_socket()
        self.host, self.port = host, int(self.socket.getsockname()[1])
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_in_thread(scorer: Scorer, host: str = "127.0.0.1", port: int = 0, *,
                    limits: ServiceLimits | None = None, admin_token: str | None = None) -> RunningServer:
    """Serve ``scorer`` on ``host:port`` (0: any free port, see ``.port``) until ``.stop()``."""
    limits = limits or ServiceLimits()
    return RunningServer(create_app(scorer, limits, admin_token=admin_token), host, port, limits)


# --- several workers ------------------------------------------------------------------------------
@dataclass
class WorkerSettings:
    """What a worker process needs to load its own model (travels as JSON in CONFIG_ENV)."""

    model: str
    threads: int
    max_k: int
    max_batch: int
    limits: dict[str, Any]
    log_level: str = "WARNING"


def app_from_env() -> Any:
    """uvicorn's app factory in each worker: load the model named in CONFIG_ENV and build the app."""
    settings = WorkerSettings(**json.loads(os.environ[CONFIG_ENV]))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s [%(process)d] %(message)s")
    scorer = Scorer.load(settings.model, threads=settings.threads, max_k=settings.max_k, max_batch=settings.max_batch)
    return create_app(scorer, ServiceLimits(**settings.limits), admin_token=admin_token())


class ReloadingSupervisor(Multiprocess):
    """uvicorn's worker supervisor whose SIGHUP restarts the workers only onto a file set that loads."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], scorer: Scorer) -> None:
        super().__init__(config, sockets)
        self.scorer = scorer

    def handle_hup(self) -> None:
        try:
            info = self.scorer.reload()  # the same checks a single worker makes, here before any restart
        except ModelLoadError as exc:
            log.error("SIGHUP: new model rejected, workers keep serving sha256 %s: %s", self.scorer.model.sha256[:12], exc)
            return
        log.info("SIGHUP: restarting the workers on sha256 %s", info["sha256"][:12])
        super().handle_hup()


def serve_workers(scorer: Scorer, host: str, port: int, limits: ServiceLimits, log_level: str,
                  sock: socket.socket) -> None:
    """Run ``limits.workers`` processes on ``sock`` until SIGINT/SIGTERM."""
    os.environ[CONFIG_ENV] = json.dumps({
        "model": str(Path(scorer.model.path).resolve()), "threads": scorer.threads, "max_k": scorer.max_k,
        "max_batch": scorer.max_batch, "limits": limits.to_dict(), "log_level": log_level})
    config = uvicorn_config("rectrain.serving.runner:app_from_env", host, port, limits, factory=True,
                            log_level=log_level)
    ReloadingSupervisor(config, [sock], scorer).run()
