"""``serve_onnx.py``: the HTTP service and the batch scorer, on onnxruntime only (no torch).

    python serve_onnx.py serve model.onnx [--host 127.0.0.1] [--port 8000] [--threads 1]
    python serve_onnx.py batch model.onnx requests.jsonl [--output answers.jsonl] [--endpoint recommend]

Batch input is JSON lines (one request object per line, as the HTTP body) or CSV (``.csv``, or
``--format csv``) with a header naming request fields; list fields (``history``, ``exclude``,
``items``) hold space-separated ids. Output is JSON lines, one answer per input line in order, each
with its ``line`` number; a bad line gets ``{"line": n, "error": reason}`` and the rest go on.
Exit status: 0 all lines answered, 1 some lines rejected, 2 the model or the input cannot be read.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, TextIO

from rectrain.serving.model import ModelLoadError
from rectrain.serving.scorer import DEFAULT_MAX_BATCH, DEFAULT_MAX_K, RequestError, Scorer
from rectrain.serving.server import DEFAULT_MAX_BODY, make_server

log = logging.getLogger("rectrain.serving")

LIST_FIELDS = ("history", "exclude", "items")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve_onnx.py", description="Serve or batch-score a rectrain ONNX export.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="the main .onnx file written by export.py")
    common.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    common.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="largest k a request may ask for")
    serve = sub.add_parser("serve", parents=[common], help="HTTP JSON service")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port; printed on start)")
    serve.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body in bytes")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most requests in one /recommend list")
    serve.add_argument("--log-level", default="INFO")
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
    try:
        scorer = Scorer.load(args.model, threads=args.threads, max_k=args.max_k,
                             **({"max_batch": args.max_batch} if args.command == "serve" else {}))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in scorer.model.warnings:
        log.warning("%s", warning)
    if args.command == "serve":
        return serve(scorer, args.host, args.port, args.max_body)
    return batch(scorer, args)


# --- serve --------------------------------------------------------------------------------------
def serve(scorer: Scorer, host: str, port: int, max_body: int) -> int:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the model file (a broken one is rejected)."""
    server = make_server(scorer, host, port, max_body=max_body)

    def reload_in_background(*_: Any) -> None:
        def run() -> None:
            try:
                info = scorer.reload()
                log.info("SIGHUP: now serving sha256 %s", info["sha256"][:12])
            except ModelLoadError as exc:
                log.error("SIGHUP: new model rejected, still serving sha256 %s: %s", scorer.model.sha256[:12], exc)
        threading.Thread(target=run, name="reload", daemon=True).start()

    def stop(*_: Any) -> None:  # shutdown() waits for serve_forever: call it from another thread
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload_in_background)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    model = scorer.model
    print(f"serving {model.kind} model {model.path} (sha256 {model.sha256[:12]}) on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


# --- batch --------------------------------------------------------------------------------------
def _csv_rows(handle: TextIO) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(handle)
    for row in reader:
        request: dict[str, Any] = {}
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
                except ValueError:
                    request[key] = value  # rejected with the reason by the scorer
            elif key == "exclude_seen":
                request[key] = {"true": True, "false": False}.get(value.lower(), value)
            else:
                request[key] = value
        else:
            yield reader.line_num, request


def _jsonl_rows(handle: TextIO) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            yield number, RequestError(f"malformed JSON: {exc}")


def batch(scorer: Scorer, args: argparse.Namespace) -> int:
    """Answer every request of the input file; bad lines become error lines."""
    fmt = args.format or ("csv" if str(args.input).lower().endswith(".csv") else "jsonl")
    try:
        source: TextIO = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8", newline="")
    except OSError as exc:
        print(f"error: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 2
    sink: TextIO = sys.stdout if args.output == "-" else io.StringIO()
    failed = total = 0
    with source:
        rows = _csv_rows(source) if fmt == "csv" else _jsonl_rows(source)
        pending: list[tuple[int, Any]] = []

        def flush() -> None:
            nonlocal failed
            model = scorer.model
            queries, slots = [], []
            answers: list[dict[str, Any]] = []
            for number, request in pending:
                try:
                    if isinstance(request, Exception):
                        raise request
                    queries.append(scorer.parse(request, args.endpoint, model))
                    slots.append(len(answers))
                    answers.append({"line": number})
                except RequestError as exc:
                    failed += 1
                    answers.append({"line": number, "error": str(exc)})
            try:
                for slot, answer in zip(slots, scorer.run(queries, model) if queries else []):
                    answers[slot].update(answer)
            except RequestError as exc:  # e.g. score requested from a model without its score graph
                failed += len(slots)
                for slot in slots:
                    answers[slot]["error"] = str(exc)
            for answer in answers:
                sink.write(json.dumps(answer, ensure_ascii=False) + "\n")
            pending.clear()

        for row in rows:
            pending.append(row)
            total += 1
            if len(pending) >= args.batch_size:
                flush()
        flush()
    if args.output != "-":
        from rectrain.utils.io import write_text_atomic

        write_text_atomic(Path(args.output), sink.getvalue())  # type: ignore[union-attr]
    print(f"{total - failed} of {total} requests answered, {failed} rejected", file=sys.stderr)
    return 1 if failed else 0
