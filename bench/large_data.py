"""How big a log the data pipeline handles, and at what peak memory.

Generates a synthetic log of N events, writes it as Parquet (row groups of 1M rows), then in a
fresh process reads + preprocesses + splits + caches it through the same code as train.py, and in
another fresh process loads the cache (memory-mapped) and builds one epoch's training batches.
Peak resident memory of each stage is its process's ru_maxrss.

    python bench/large_data.py --events 10000000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_generate(path: Path, events: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rectrain.data.synthetic import generate_synthetic

    start = time.perf_counter()
    n_users = max(1000, events // 50)
    log = generate_synthetic(n_users=n_users, n_items=max(1000, events // 200), mean_length=50, seed=0)
    frame = log.interactions
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=1_000_000)
    return {"events": len(frame), "seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}


def stage_prepare(path: Path, cache: Path) -> dict:
    from rectrain.data.dataset import SplitConfig, load_or_prepare
    from rectrain.data.preprocess import PreprocessConfig
    from rectrain.data.sources import InteractionFileSource

    start = time.perf_counter()
    source = InteractionFileSource(str(path), {"user": "user", "item": "item", "timestamp": "timestamp"})
    data = load_or_prepare(source, PreprocessConfig(min_user_interactions=5, min_item_interactions=5),
                           SplitConfig(), cache)
    return {"train_events": len(data.train), "users": data.n_users, "items": data.n_items,
            "seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}


def stage_train_batches(path: Path, cache: Path) -> dict:
    import numpy as np

    from rectrain.data.batching import NegativeSampler, PointwiseBatches, PointwiseSpec
    from rectrain.data.dataset import SplitConfig, load_or_prepare
    from rectrain.data.preprocess import PreprocessConfig
    from rectrain.data.sources import InteractionFileSource

    start = time.perf_counter()
    source = InteractionFileSource(str(path), {"user": "user", "item": "item", "timestamp": "timestamp"})
    data = load_or_prepare(source, PreprocessConfig(min_user_interactions=5, min_item_interactions=5),
                           SplitConfig(), cache)
    loaded = time.perf_counter() - start
    spec = PointwiseSpec(n_negatives=4, exclude_positives=False)
    batches = PointwiseBatches(data.train.user, data.train.item, data.n_items, spec, 8192,
                               NegativeSampler(data.n_items), seed=0)
    n = 0
    for batch in batches:
        n += int(batch["label"].numel())
    return {"cache_load_seconds": loaded, "epoch_batches_seconds": time.perf_counter() - start - loaded,
            "samples": n, "peak_mb": _peak_mb(), "dtype_check": str(np.asarray(data.train.user).dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--stage", choices=["generate", "prepare", "batches"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        fn = {"generate": lambda: stage_generate(args.dir / "log.parquet", args.events),
              "prepare": lambda: stage_prepare(args.dir / "log.parquet", args.dir / "cache"),
              "batches": lambda: stage_train_batches(args.dir / "log.parquet", args.dir / "cache")}[args.stage]
        print(json.dumps(fn()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for stage in ("generate", "prepare", "batches"):
            out = subprocess.run([sys.executable, __file__, "--stage", stage, "--dir", tmp, "--events", str(args.events)],
                                 capture_output=True, text=True, check=True)
            rows[stage] = json.loads(out.stdout.strip().splitlines()[-1])
        size = (Path(tmp) / "log.parquet").stat().st_size / 1e6
    print(f"Synthetic log: {rows['generate']['events']:,} events, Parquet {size:.0f} MB\n")
    print("| stage (fresh process each) | seconds | peak RSS (MB) |\n|---|---:|---:|")
    print(f"| generate + write Parquet | {rows['generate']['seconds']:.1f} | {rows['generate']['peak_mb']:.0f} |")
    p = rows["prepare"]
    print(f"| read Parquet + dedup + 5-core + vocabularies + leave-one-out + cache | {p['seconds']:.1f} | {p['peak_mb']:.0f} |")
    b = rows["batches"]
    print(f"| load cache (memory-mapped) | {b['cache_load_seconds']:.2f} | |")
    print(f"| one epoch of pointwise batches (4 negatives, {b['samples']:,} samples) | {b['epoch_batches_seconds']:.1f} | {b['peak_mb']:.0f} |")
    print(f"\nprepared: {p['users']:,} users, {p['items']:,} items, {p['train_events']:,} training events")


if __name__ == "__main__":
    main()
