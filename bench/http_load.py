"""A bounded local load test of the HTTP service: requests/second, latency percentiles, errors.

Starts ``serve_onnx.py serve`` in its own process on a free loopback port, then ``--clients``
threads each send their share of ``--requests`` POST /recommend requests over one keep-alive
connection (stdlib ``http.client``). Requests are realistic: histories of 1..50 raw item ids drawn
from the model's vocabulary, one in ten holding an unknown id, one in twenty empty (cold start),
k 10. Any non-200 answer or connection error counts as an error. The client runs on the same
machine, so its CPU use is part of what limits the figures.

Model: ``--model model.onnx`` (an export), or (default) a two-tower model of the default sizes
trained briefly on generated data and exported (see ``bench/onnx_latency.py``).

    python bench/http_load.py [--model model.onnx] [--requests 3000] [--clients 8] [--server-threads 1]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402


def start_service(model: Path, threads: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve_onnx.py"), "serve", str(model), "--port", "0",
                             "--threads", str(threads), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"the service did not start: {line}{proc.stderr.read()}")
    return proc, int(line.rsplit(":", 1)[1])


def bodies(vocab: list[str], n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        history = [vocab[j] for j in rng.integers(0, len(vocab), rng.integers(1, 51))]
        if i % 10 == 3:
            history.append("unknown-item")
        if i % 20 == 7:
            history = []
        out.append(json.dumps({"history": history, "k": 10}).encode())
    return out


def client(port: int, work: list[bytes], latencies: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for body in work:
        start = time.perf_counter()
        try:
            conn.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append(f"{response.status}: {payload[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        latencies.append(time.perf_counter() - start)
    conn.close()


def run_load(port: int, vocab: list[str], requests: int, clients: int) -> dict[str, float]:
    work = bodies(vocab, requests)
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=client, args=(port, work[i::clients], latencies, errors)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        print(f"first errors: {errors[:3]}", file=sys.stderr)
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "clients": clients, "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "errors": len(errors)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported main .onnx file (default: train and export a small two-tower)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--server-threads", type=int, default=1, help="onnxruntime intra-op threads of the service")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rectrain-http-") as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            import torch
            from onnx_latency import export_models, train_default_models

            torch.set_num_threads(1)
            ckpt = train_default_models(Path(tmp))
            model = export_models({"two_tower": ckpt["two_tower"]}, Path(tmp))["two_tower"]
        from rectrain.serving import OnnxModel

        loaded = OnnxModel.load(model)
        if loaded.kind != "two_tower":
            raise SystemExit("this load test sends two-tower requests (histories); export a two-tower model")
        proc, port = start_service(model, args.server_threads)
        try:
            rows = [run_load(port, loaded.item_vocab, args.requests, c) for c in args.clients]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"HTTP service (ThreadingHTTPServer, onnxruntime {args.server_threads} intra-op thread(s)) on loopback, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; POST /recommend, k 10, "
          f"histories of 1..50 items ({loaded.n_items} items in the catalog)\n")
    print("| clients | requests | seconds | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['seconds']:.1f} | {r['rps']:,.0f} | {r['p50']:.2f} | "
              f"{r['p90']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['errors']} |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
