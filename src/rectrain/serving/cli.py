"""``serve_onnx.py``: the HTTP service and the batch scorer, on onnxruntime only (no torch).

    python serve_onnx.py serve model.onnx [--host 127.0.0.1] [--port 8000] [--threads 1] [--workers 1]
        [--admin-token T] [--max-body 1048576] [--request-timeout 30] [--keep-alive 5] [--max-connections 256]
    python serve_onnx.py batch model.onnx requests.jsonl [--output answers.jsonl] [--endpoint recommend]

Both use the export's ANN index when it has one (``export.py ann=...``); ``--exact`` scores the whole
catalog instead.

``serve`` binds 127.0.0.1 by default; any other address needs an admin token (``--admin-token`` or
``RECTRAIN_ADMIN_TOKEN``) for ``/admin/reload``, else it refuses to start (exit 2). SIGHUP reloads
the model file set (a broken one is rejected and the old model keeps serving).

Batch input is JSON lines (one request object per line, as the HTTP body) or CSV (``.csv``, or
``--format csv``) with a header naming request fields; list fields (``history``, ``exclude``,
``items``) hold space-separated ids. Output is JSON lines, one answer per input line in order, each
with its ``line`` number; a bad line (not UTF-8, malformed JSON, a field the scorer refuses) gets
``{"line": n, "error": reason}`` and the rest go on. Input and output stream (memory does not grow
with the file); the closing line on standard error gives the requests/s. The output file is written under a temporary
name and renamed when complete. Exit status: 0 all lines answered, 1 some lines rejected (their
count on standard error), 2 the model or the input cannot be read, or ``serve`` refuses its flags.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import signal
import sys
import threading
import time
from typing import Any, BinaryIO, Iterator, TextIO

from rectrain.serving.auth import TOKEN_ENV, admin_token, is_loopback
from rectrain.serving.jsonbody import parse_json
from rectrain.serving.model import ModelLoadError
from rectrain.serving.scorer import DEFAULT_MAX_BATCH, DEFAULT_MAX_K, RequestError, Scorer
from rectrain.serving.server import DEFAULT_MAX_BODY, ServiceLimits, create_app
from rectrain.utils.io import atomic_path

log = logging.getLogger("rectrain.serving")

LIST_FIELDS = ("history", "exclude", "items")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve_onnx.py", description="Serve or batch-score a rectrain ONNX export.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="the main .onnx file written by export.py")
    common.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    common.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="largest k a request may ask for")
    common.add_argument("--exact", action="store_true",
                        help="score the whole catalog for every request even when the export has an ANN index")
    defaults = ServiceLimits()
    serve = sub.add_parser("serve", parents=[common], help="HTTP JSON service")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port; printed on start)")
    serve.add_argument("--workers", type=int, default=1, help="processes, one model each (default 1)")
    serve.add_argument("--admin-token", help=f"bearer token for /admin/reload (or {TOKEN_ENV}); required "
                                             "unless bound to a loopback address")
    serve.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body in bytes")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most requests in one /recommend list")
    serve.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                       help="seconds a client has to send a request's headers, and again its body (408)")
    serve.add_argument("--keep-alive", type=int, default=defaults.keep_alive,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections,
                       help="concurrent connections per worker; requests beyond are answered 503")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                       help="logging level (any case)")
    batch = sub.add_parser("batch", parents=[common], help="score a JSON-lines or CSV file of requests")
    batch.add_argument("input", help="requests file (.jsonl or .csv), or - for standard input")
    batch.add_argument("--output", "-o", default="-", help="answers as JSON lines (default: standard output)")
    batch.add_argument("--format", choices=("jsonl", "csv"), help="input format (default: from the file name)")
    batch.add_argument("--endpoint", choices=("recommend", "score"), default="recommend")
    batch.add_argument("--batch-size", type=int, default=256, help="requests per graph call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"), format="%(asctime)s %(levelname)s %(message)s")
    token = admin_token(args.admin_token) if args.command == "serve" else None
    problem = _serve_flags_problem(args, token) if args.command == "serve" else _batch_flags_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        scorer = Scorer.load(args.model, threads=args.threads, max_k=args.max_k, exact=args.exact,
                             **({"max_batch": args.max_batch} if args.command == "serve" else {}))
    except ModelLoadError as exc:
        print(f"error: cannot serve {args.model}: {exc}", file=sys.stderr)
        return 2
    for warning in scorer.model.warnings:
        log.warning("%s", warning)
    if args.command == "serve":
        limits = ServiceLimits(max_body=args.max_body, request_timeout=args.request_timeout,
                               keep_alive=args.keep_alive, max_connections=args.max_connections, workers=args.workers)
        return serve(scorer, args.host, args.port, limits, token, args.log_level)
    return batch(scorer, args)


def _serve_flags_problem(args: argparse.Namespace, token: str | None) -> str | None:
    if args.admin_token == "":
        return "--admin-token is empty (omit it for no token, which only a loopback bind allows)"
    if token is not None and token != token.strip():
        # an HTTP client cannot send surrounding whitespace in a header: such a token never matches
        return "the admin token begins or ends with whitespace; no Authorization header could carry it"
    if not is_loopback(args.host) and token is None:
        return (f"binding {args.host} exposes /admin/reload beyond this machine; set --admin-token or "
                f"{TOKEN_ENV} (or bind 127.0.0.1)")
    if not math.isfinite(args.request_timeout):  # nan closed every connection at once; inf: no deadline
        return f"--request-timeout must be a finite number of seconds, got {args.request_timeout}"
    return _positive(args, ("workers", "max_body", "max_connections", "keep_alive", "request_timeout",
                            "max_k", "max_batch"))


def _batch_flags_problem(args: argparse.Namespace) -> str | None:
    return _positive(args, ("max_k", "batch_size"))


def _positive(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    for name in names:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    return None


# --- serve --------------------------------------------------------------------------------------
def serve(scorer: Scorer, host: str, port: int, limits: ServiceLimits, token: str | None = None,
          log_level: str = "INFO") -> int:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the model file set (a broken one is rejected)."""
    import uvicorn

    from rectrain.serving.runner import serve_workers, uvicorn_config

    config = uvicorn_config(create_app(scorer, limits, admin_token=token), host, port, limits, log_level=log_level)
    sock = config.bind_socket()
    sock.listen(config.backlog)  # connections queue from now on: the line below may be read as "ready"
    bound_port = sock.getsockname()[1]
    model = scorer.model
    print(f"serving {model.kind} model {model.path.name} (sha256 {model.sha256[:12]}) with {limits.workers} "
          f"worker(s) on http://{host}:{bound_port}", flush=True)
    if limits.workers > 1:
        if token is not None:
            import os

            os.environ[TOKEN_ENV] = token  # the workers read it (they are started with this environment)
        serve_workers(scorer, host, port, limits, log_level, sock)
        return 0

    def reload_in_background(*_: Any) -> None:
        def run() -> None:
            try:
                info = scorer.reload()
                log.info("SIGHUP: now serving sha256 %s", info["sha256"][:12])
            except ModelLoadError as exc:
                log.error("SIGHUP: new model rejected, still serving sha256 %s: %s", scorer.model.sha256[:12], exc)
        threading.Thread(target=run, name="reload", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload_in_background)
    for stop in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its graceful stop:
        signal.signal(stop, lambda *_: None)       # with these handlers that ends in a normal exit 0
    uvicorn.Server(config).run(sockets=[sock])  # on SIGINT/SIGTERM: finishes in-flight requests, then stops
    return 0


# --- batch --------------------------------------------------------------------------------------
def _has_surrogate(text: str | None) -> bool:
    """True for text read with ``surrogateescape`` from bytes that are not UTF-8."""
    if text is None:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_rows(handle: TextIO) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(handle)
    for row in reader:
        request: dict[str, Any] = {}
        if any(_has_surrogate(key) or (isinstance(value, str) and _has_surrogate(value))
               for key, value in row.items()):
            yield reader.line_num, RequestError("line is not UTF-8 text")
            continue
        for key, value in row.items():
            if key is None:
                yield reader.line_num, RequestError("more fields than the header names")
                break
            if key in LIST_FIELDS:  # an empty cell is an empty list (a history may be empty)
                request[key] = (value or "").split()
            elif value is None or value == "":
                continue
            elif key == "k":
                try:
                    request[key] = int(value)
                except ValueError:  # not a number, or longer than Python converts
                    request[key] = value  # rejected with the reason by the scorer
            elif key == "exclude_seen":
                request[key] = {"true": True, "false": False}.get(value.lower(), value)
            else:
                request[key] = value
        else:
            yield reader.line_num, request


def _jsonl_rows(handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    """Each line decoded on its own: undecodable bytes, huge numbers or lone surrogates cost one line."""
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield number, parse_json(line, what="line")
        except RequestError as exc:
            yield number, exc


class _Answers:
    """Writes one JSON line per input line, in order, and counts the rejected ones."""

    def __init__(self, scorer: Scorer, endpoint: str, sink: TextIO) -> None:
        self.scorer, self.endpoint, self.sink = scorer, endpoint, sink
        self.failed = self.total = 0

    def flush(self, pending: list[tuple[int, Any]]) -> None:
        model = self.scorer.model
        queries, slots = [], []
        answers: list[dict[str, Any]] = []
        for number, request in pending:
            self.total += 1
            try:
                if isinstance(request, Exception):
                    raise request
                queries.append(self.scorer.parse(request, self.endpoint, model))
                slots.append(len(answers))
                answers.append({"line": number})
            except RequestError as exc:
                answers.append({"line": number, "error": str(exc)})
        try:
            results = self.scorer.run(queries, model) if queries else []
        except RequestError as exc:  # e.g. score requested from a model without its score graph
            results = [exc] * len(queries)
        except Exception:  # a request the batch cannot answer: answer one by one, so it costs its line only
            results = [self._one(query, model) for query in queries]
        for slot, result in zip(slots, results):
            if isinstance(result, Exception):
                answers[slot]["error"] = str(result)
            else:
                answers[slot].update(result)
        for answer in answers:
            self.failed += "error" in answer
            self.sink.write(json.dumps(answer, ensure_ascii=False) + "\n")
        pending.clear()

    def _one(self, query: Any, model: Any) -> dict[str, Any] | Exception:
        try:
            return self.scorer.run([query], model)[0]
        except Exception as exc:
            log.exception("internal error answering one batch line")
            return RequestError(f"internal error: {type(exc).__name__}: {exc}", 500)


def _open_input(path: str, fmt: str) -> Any:
    """JSON lines as bytes (decoded line by line); CSV as text keeping undecodable bytes as surrogates.

    A CSV's UTF-8 byte-order mark (spreadsheet exports write one) is dropped, not read into the first
    column's name; JSON lines drop theirs line by line (:func:`parse_json`).
    """
    if path == "-":
        if fmt == "jsonl":
            return sys.stdin.buffer
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    if fmt == "jsonl":
        return open(path, "rb")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _score_all(answers: _Answers, source: Any, fmt: str, batch_size: int) -> None:
    with source:
        pending: list[tuple[int, Any]] = []
        for row in _csv_rows(source) if fmt == "csv" else _jsonl_rows(source):
            pending.append(row)
            if len(pending) >= batch_size:
                answers.flush(pending)
        answers.flush(pending)


def batch(scorer: Scorer, args: argparse.Namespace) -> int:
    """Answer every request of the input file; a bad line becomes an error line and the rest go on.

    The output file is written under a temporary name and renamed when complete: a reader never
    sees half of it, and a failed run leaves any previous answers file as it was.
    """
    started = time.perf_counter()
    fmt = args.format or ("csv" if str(args.input).lower().endswith(".csv") else "jsonl")
    try:
        source = _open_input(args.input, fmt)
    except OSError as exc:
        print(f"error: cannot read {args.input}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        if args.output == "-":
            answers = _Answers(scorer, args.endpoint, sys.stdout)
            _score_all(answers, source, fmt, args.batch_size)
        else:
            with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as sink:
                answers = _Answers(scorer, args.endpoint, sink)
                _score_all(answers, source, fmt, args.batch_size)
    except OSError as exc:  # a failed rename names its destination second: name that, not the temporary
        where = getattr(exc, "filename2", None) or getattr(exc, "filename", None) or args.input
        print(f"error: {exc.strerror or exc} ({where})", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    retrieval = "ann" if scorer.model.ann is not None and not scorer.exact else "exact"
    print(f"{answers.total - answers.failed} of {answers.total} requests answered, {answers.failed} rejected; "
          f"{answers.total / max(seconds, 1e-9):,.0f} requests/s ({seconds:.1f} s, {retrieval} retrieval)",
          file=sys.stderr)
    return 1 if answers.failed else 0
