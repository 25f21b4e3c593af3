"""Serving latency: onnxruntime beside PyTorch eager for the same exported graph, in one run.

Both engines run the same ``recommend`` computation: for the two-tower model the query tower over a
history, one product with the precomputed item vectors, exclusion of the history and a top-10; for
NeuMF the full-catalog scores of a user, exclusion and a top-10. PyTorch runs the export wrapper
module (``rectrain.export.wrappers``) in eager mode under ``inference_mode``; onnxruntime runs the
exported file. Calls alternate between the engines (torch, onnx, torch, onnx, ...) so a change of
machine load hits both alike. Threads are set deliberately: ``torch.set_num_threads(t)`` and
onnxruntime ``intra_op_num_threads = t`` for t in ``--threads`` (default 1 and 2).

* single request: batch 1, a history of 20 items (NeuMF: one user, 20 excluded items), k 10:
  p50 and p99 over ``--requests`` calls;
* throughput: batch 256 (histories of 1..50 items, padded to 50; the histories are excluded), k 10:
  rows per second over ``--batches`` calls.

Models: ``--ckpt`` checkpoints, or (default) a two-tower and a NeuMF model of the default sizes
trained briefly on generated data (the weights do not change the cost, the sizes do).

    python bench/onnx_latency.py [--ckpt a.ckpt --ckpt b.ckpt] [--threads 1 2] [--requests 500]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LEAN_OVERRIDES, compose_train_config, quiet_lightning  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

#: generated data for the default models: the default catalog size, a short training run
TRAIN_OVERRIDES = ["data.source.n_users=2000", "data.source.n_items=1000", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=2", "test=false"]


def train_default_models(workdir: Path) -> dict[str, Path]:
    """Two-tower and NeuMF checkpoints of the default model sizes (a short run on generated data)."""
    from rectrain.training import train

    quiet_lightning()
    out = {}
    for model in ("two_tower", "neumf"):
        cfg = compose_train_config([*LEAN_OVERRIDES, f"model={model}", *TRAIN_OVERRIDES,
                                    f"paths.cache_dir={workdir / 'cache'}"], workdir / model)
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own results table
            out[model] = Path(train(cfg)["best_checkpoint"])
    return out


def export_models(checkpoints: dict[str, Path], workdir: Path) -> dict[str, Path]:
    from rectrain.export import export_checkpoint

    return {name: export_checkpoint(ckpt, workdir / f"{name}.onnx").files["recommend"]
            for name, ckpt in checkpoints.items()}


def make_inputs(kind: str, n_items: int, n_users: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Feeds of the recommend graph: batch 1 reads 20 items; larger batches 1..50 items padded to 50."""
    if kind == "two_tower":
        width = 20 if batch == 1 else 50
        history = rng.integers(0, n_items, size=(batch, width)).astype(np.int64)
        lengths = np.full(batch, width, np.int64) if batch == 1 else rng.integers(1, width + 1, batch).astype(np.int64)
        exclude = np.where(np.arange(width)[None, :] < lengths[:, None], history, -1)
        return {"history": history, "lengths": lengths, "exclude": exclude, "k": np.array(10, np.int64)}
    exclude = rng.integers(0, n_items, size=(batch, 20 if batch == 1 else 50)).astype(np.int64)
    return {"user": rng.integers(0, n_users, batch).astype(np.int64), "exclude": exclude, "k": np.array(10, np.int64)}


def alternate(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 10) -> dict[str, list[float]]:
    """Seconds per call of each engine, the engines interleaved call by call."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(name: str, ckpt: Path, onnx_path: Path, threads: int, requests: int, batches: int) -> dict[str, Any]:
    from rectrain.export.graphs import graph_specs
    from rectrain.runs import open_run

    run = open_run(ckpt)
    net, kind = run.net, run.kind
    module = graph_specs(net)[0].module.eval()  # the exported recommend wrapper, run eagerly
    n_items = int(net.n_items if kind == "two_tower" else net.config["n_items"])
    n_users = 0 if kind == "two_tower" else int(net.config["n_users"])
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(0)
    row: dict[str, Any] = {"model": name, "threads": threads}
    for batch, repeats in ((1, requests), (256, batches)):
        feed = make_inputs(kind, n_items, n_users, batch, rng)
        tensors = [torch.from_numpy(feed[n]) for n in names]

        def eager() -> Any:
            with torch.inference_mode():
                return module(*tensors)

        def onnx() -> Any:
            return session.run(None, feed)

        # same answers before timing anything
        t_items, _ = eager()
        o_items, _ = onnx()
        agree = float(np.mean(t_items.numpy() == o_items))
        times = alternate({"torch": eager, "onnx": onnx}, repeats)
        if batch == 1:
            for engine in ("torch", "onnx"):
                row[f"{engine}_p50_ms"] = percentile(times[engine], 50) * 1e3
                row[f"{engine}_p99_ms"] = percentile(times[engine], 99) * 1e3
            row["agree_b1"] = agree
        else:
            for engine in ("torch", "onnx"):
                row[f"{engine}_rows_s"] = batch * len(times[engine]) / sum(times[engine])
            row["agree_b256"] = agree
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | threads | torch p50 ms | torch p99 ms | onnx p50 ms | onnx p99 ms | batch-1 p50 speed-up "
             "| torch rows/s @256 | onnx rows/s @256 | @256 speed-up | same top-10 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['torch_p50_ms']:.3f} | {r['torch_p99_ms']:.3f} | "
            f"{r['onnx_p50_ms']:.3f} | {r['onnx_p99_ms']:.3f} | {r['torch_p50_ms'] / r['onnx_p50_ms']:.2f}x | "
            f"{r['torch_rows_s']:,.0f} | {r['onnx_rows_s']:,.0f} | {r['onnx_rows_s'] / r['torch_rows_s']:.2f}x | "
            f"{min(r['agree_b1'], r['agree_b256']):.0%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", help="checkpoint(s) to measure (default: train two small ones)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=500, help="single requests timed per engine")
    parser.add_argument("--batches", type=int, default=20, help="batch-256 calls timed per engine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rectrain-bench-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        if args.ckpt:
            from rectrain.runs import open_run

            checkpoints = {f"{type(open_run(c).net).__name__} ({Path(c).name})": Path(c)
                           for c in args.ckpt}
        else:
            torch.set_num_threads(1)
            checkpoints = train_default_models(workdir)
        exported = export_models(checkpoints, workdir)
        prepared = time.perf_counter() - started
        rows = [measure(name, checkpoints[name], exported[name], threads, args.requests, args.batches)
                for threads in args.threads for name in checkpoints]
    print(f"onnxruntime {ort.__version__} vs torch {torch.__version__} eager, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
          f"(models prepared in {prepared:.0f} s)\n")
    print("Single request: batch 1, k 10 (two-tower: a 20-item history, excluded; NeuMF: 20 excluded items). "
          "Throughput: batch 256, k 10. Engines alternate call by call.\n")
    print(table(rows))
    ok = all(r["onnx_p50_ms"] <= r["torch_p50_ms"] for r in rows)
    print(f"\nonnxruntime at least as fast as eager at batch 1 (p50), every row: {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
