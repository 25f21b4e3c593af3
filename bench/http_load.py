"""The HTTP service under local load, old (stdlib) and new (Starlette + uvicorn) side by side.

Each server runs in its own process on a free loopback port: ``old`` is the stdlib
``ThreadingHTTPServer`` service as of commit 65afbed, read from git (``git show``) into a temporary
module, so no second copy of it lives in the repository (it imports today's ``rectrain.serving``
scorer and model, whose API it uses is unchanged); ``new`` is ``serve_onnx.py serve`` with 1 worker
and, for comparison, 2 workers. Then ``--clients`` threads each send their share of the round's
POST /recommend requests over one keep-alive connection (stdlib ``http.client``). Requests are
realistic: histories of 1..50 raw item ids drawn from the model's vocabulary, one in ten holding an
unknown id, one in twenty empty (cold start), k 10. Any non-200 answer or connection error counts
as an error. The client runs on the same machine, so its CPU use is part of what limits the figures;
on a shared machine the rounds alternate between the servers and the table gives per-round medians.

Model: ``--model model.onnx`` (a two-tower export), or (default) a two-tower model of the default
sizes trained briefly on generated data and exported (see ``bench/onnx_latency.py``).

    python bench/http_load.py [--model model.onnx] [--clients 1 16 64] [--rounds 3] [--requests 1500]
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

OLD_COMMIT = "65afbed"
#: runs the old stdlib server read from git; argv: module file, model path
OLD_SERVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rectrain_old_server", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from rectrain.serving.scorer import Scorer
server = old.make_server(Scorer.load(sys.argv[2], threads=1), "127.0.0.1", 0)
print(f"serving on {server.url}", flush=True)
server.serve_forever(poll_interval=0.2)
"""


def start(command: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"a server did not start: {command}: {line!r}")
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
        start_time = time.perf_counter()
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
        latencies.append(time.perf_counter() - start_time)
    conn.close()


def run_load(port: int, work: list[bytes], clients: int) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=client, args=(port, work[i::clients], latencies, errors)) for i in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start_time
    if errors:
        print(f"first errors: {errors[:3]}", file=sys.stderr)
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)), "errors": len(errors)}


def old_server_module(folder: Path) -> Path:
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/rectrain/serving/server.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = folder / "rectrain_old_server.py"
    path.write_text(source)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported two-tower main .onnx file (default: train and export one)")
    parser.add_argument("--requests", type=int, default=1500, help="requests per round")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server and client count (medians)")
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
        env_python = [sys.executable]
        servers = {
            ("old (stdlib, 65afbed)", 1): env_python + ["-c", OLD_SERVER, str(old_server_module(Path(tmp))), str(model)],
            ("new (uvicorn)", 1): env_python + [str(ROOT / "serve_onnx.py"), "serve", str(model), "--port", "0",
                                                "--log-level", "WARNING"],
            ("new (uvicorn)", 2): env_python + [str(ROOT / "serve_onnx.py"), "serve", str(model), "--port", "0",
                                                "--log-level", "WARNING", "--workers", "2"],
        }
        running = {key: start(command) for key, command in servers.items()}
        time.sleep(2)  # workers up
        work = bodies(loaded.item_vocab, args.requests)
        results: dict[tuple[int, str, int], list[dict[str, float]]] = {}
        try:
            for clients in args.clients:
                for round_ in range(args.rounds):
                    order = list(running) if round_ % 2 == 0 else list(reversed(list(running)))
                    for key in order:
                        results.setdefault((clients, *key), []).append(run_load(running[key][1], work, clients))
        finally:
            for proc, _ in running.values():
                proc.terminate()
                proc.wait(timeout=15)
    print(f"POST /recommend on loopback, k 10, histories of 1..50 items ({loaded.n_items} items in the catalog); "
          f"onnxruntime 1 intra-op thread per worker; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; median of {args.rounds} alternating rounds of {args.requests} requests\n")
    print("| clients | server | workers | requests | seconds | requests/s | p50 ms | p90 ms | p99 ms | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed = 0
    for (clients, name, workers), rounds in results.items():
        med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
        errors = int(sum(r["errors"] for r in rounds))
        failed += errors
        print(f"| {clients} | {name} | {workers} | {int(med['requests'])} | {med['seconds']:.2f} | {med['rps']:,.0f} | "
              f"{med['p50']:.2f} | {med['p90']:.2f} | {med['p99']:.2f} | {errors} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
