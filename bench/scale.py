r"""Logs of 10M to 1B events: seconds, peak RSS and disk per stage, each stage in a fresh process.

    python bench/scale.py --events 10000000,100000000,1000000000 --workdir /data/scale
    python bench/scale.py --events 10000000 --compare-pandas          # the former pandas path beside it
    python bench/scale.py --events 100000000 --stages generate,csv,preprocess_csv   # a CSV log
    python bench/scale.py --events 50000000 --items 100000 --stages generate,preprocess,evaluate \
        --eval-users 1000000                                          # 1M users ranked over 100k items

Stages (each a fresh ``python bench/scale.py --stage ...`` process; peak RSS = its ru_maxrss, which
includes the pages of memory-mapped cache files it read; peak anon = the peak of its private memory,
RssAnon, sampled every 0.2 s; iowait_s / steal_s = CPU seconds, summed over the cores, spent
waiting on the disk / given by the hypervisor to other machines while it ran):

* ``generate``: a synthetic log written as Parquet in chunks of 10M rows (the generator streams:
  it never holds more than one chunk); users ~ events/50, items ~ events/100 (at most 1M), item
  popularity a power law, timestamps in whole seconds over a year (ties, broken by file order).
* ``preprocess``: ``load_or_prepare`` on the Parquet directory with the DuckDB engine (k-core 5/5,
  dedup first, leave-one-out), writing the cache; disk = peak size of the cache folder while it
  runs (spill included, sampled every second).
* ``csv`` / ``preprocess_csv``: the same log as one CSV file, written batch by batch, then prepared
  from it: validated chunk by chunk (exact lines in errors) and streamed to the engine as Parquet.
* ``pandas`` (``--compare-pandas``): the former path: the validated reader into pandas, then
  ``prepare_in_memory``, then the cache write.
* ``load``: opening the cache (memory-mapped) with checksums, as the first run after a build does.
* ``load_cold``: the same after evicting the cache's files from the page cache (fadvise): every
  size read from the disk, where ``load`` reads a cache small enough to stay in memory from RAM.
* ``train_mf`` / ``train_two_tower``: training throughput (events/s) over ``--train-steps`` steps of
  an epoch through train.py's own stack (MF with sampled negatives; the GRU two-tower with sampled
  softmax); the full epoch time is extrapolated and labelled so. ``train_mf_sparse`` /
  ``train_two_tower_sparse``: the same with sparse embedding gradients and LazyAdam.
* ``evaluate``: full-catalog ranking of ``--eval-users`` users (seen items excluded) in chunks.

The table is printed as Markdown, and the raw numbers as JSON to ``<workdir>/scale.json``; then
the growth of every stage's seconds (and of preprocessing's dedup, k-core and final sort) per 10x
events between consecutive sizes, marked where it passes 12x. One run of a stage moves by a
quarter on a shared machine, so a ratio of two single runs carries that twice: ``--rounds N`` runs
every size's stages N times, the sizes taking turns, and reports each stage's median round (every
round's seconds kept in ``rounds_s``):

    python bench/scale.py --events 10000000,100000000,1000000000 --stages preprocess,load,load_cold \
        --rounds 2 --keep                                              # the logs made by --stages generate
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

CHUNK_ROWS = 10_000_000
COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "ts"}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _anon_bytes() -> int:
    """This process's private (anonymous) resident memory: ru_maxrss also counts the pages of
    memory-mapped cache files it has read, which the kernel drops at will."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakWatcher:
    """The peak of ``sample()`` while a stage runs, sampled every ``every`` seconds in a thread
    (private memory; a folder's size, whose spill files come and go)."""

    def __init__(self, sample: Callable[[], int], every: float) -> None:
        self.sample, self.every, self.peak = sample, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def sizes_for(events: int, items: int | None = None) -> tuple[int, int]:
    """(users, items) of a generated log: events/50 users; events/100 items (at most 1M) unless ``items``."""
    return max(1000, events // 50), int(items) if items else min(1_000_000, max(1000, events // 100))


# --- stages (each runs in its own process) ----------------------------------------------------
def stage_generate(workdir: Path, events: int, seed: int = 0, items: int | None = None) -> dict:
    """Stream ``events`` rows into Parquet files of CHUNK_ROWS rows (row groups of 1M)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    folder = workdir / f"log-{events}"
    tmp = workdir / f".log-{events}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_users, n_items = sizes_for(events, items)
    year = 365 * 24 * 3600
    for index, first in enumerate(range(0, events, CHUNK_ROWS)):
        rows = min(CHUNK_ROWS, events - first)
        rng = np.random.default_rng([seed, index])
        user = rng.integers(0, n_users, rows, dtype=np.int64)
        item = np.minimum((n_items * rng.random(rows) ** 3).astype(np.int64), n_items - 1)  # power law
        ts = 1.6e9 + np.floor(rng.random(rows) * year)
        table = pa.table({"user_id": user, "item_id": item, "ts": ts})
        pq.write_table(table, tmp / f"part-{index:05d}.parquet", row_group_size=1_000_000)
        del user, item, ts, table
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"events": events, "users": n_users, "items": n_items, "seconds": time.perf_counter() - start,
            "peak_mb": _peak_mb(), "disk_mb": _dir_bytes(folder) / 2**20}


def _pre_split():
    from rectrain.data.dataset import SplitConfig
    from rectrain.data.preprocess import PreprocessConfig

    return PreprocessConfig(min_user_interactions=5, min_item_interactions=5), SplitConfig("leave_one_out")


def stage_csv(workdir: Path, events: int) -> dict:
    """The generated log as one CSV file, written batch by batch (many real logs arrive so)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    start = time.perf_counter()
    path, tmp = workdir / f"log-{events}.csv", workdir / f".log-{events}.csv.partial"
    writer = None
    with open(tmp, "wb") as sink:
        for part in sorted((workdir / f"log-{events}").glob("*.parquet")):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=1 << 20):
                writer = writer or pacsv.CSVWriter(sink, batch.schema)
                writer.write_batch(batch)
        if writer is not None:
            writer.close()
    tmp.rename(path)
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "disk_mb": path.stat().st_size / 2**20}


def stage_preprocess(workdir: Path, events: int, memory_limit: str, threads: int | None, csv: bool = False) -> dict:
    """``csv``: from the CSV copy of the log (validated in chunks, streamed to the engine as Parquet)."""
    from rectrain.data.dataset import load_or_prepare
    from rectrain.data.engine import EngineConfig
    from rectrain.data.sources import InteractionFileSource

    cache = workdir / (f"cache-csv-{events}" if csv else f"cache-{events}")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    pre, split = _pre_split()
    stages = StageSeconds()
    start = time.perf_counter()
    with PeakWatcher(lambda: _dir_bytes(cache), 1.0) as disk, stages:
        log_path = workdir / (f"log-{events}.csv" if csv else f"log-{events}")
        data = load_or_prepare(InteractionFileSource(str(log_path), COLUMNS), pre, split, cache,
                               engine=EngineConfig(memory_limit=memory_limit, threads=threads))
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "disk_peak_mb": disk.peak / 2**20,
            "cache_mb": _dir_bytes(cache) / 2**20, "train_events": len(data.train), "users": data.n_users,
            "items": data.n_items, "removed": data.stats.get("removed"), "stages": stages.seconds}


class StageSeconds(logging.Handler):
    """The seconds of each pipeline stage, from the pipeline's own log lines (nested stages included)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}
        self.logger = logging.getLogger("rectrain.data.engine.pipeline")

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("preprocessing stage"):
            name, _, seconds = record.args
            self.seconds[name] = round(self.seconds.get(name, 0.0) + float(seconds), 1)

    def __enter__(self) -> "StageSeconds":
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def stage_pandas(workdir: Path, events: int) -> dict:
    """The former path: the validated reader into pandas, the pandas pipeline, then the cache write."""
    import pyarrow.parquet as pq

    from tests.reference_pipeline import prepare_in_memory
    from rectrain.data.readers import read_interactions
    from rectrain.data.schema import RawLog
    from rectrain.utils.io import atomic_dir

    folder = workdir / f"log-{events}"
    cache = workdir / f"cache-pandas-{events}"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    files = sorted(folder.glob("*.parquet"))
    if len(files) > 1:  # the reader takes one file: join the parts first (as a user had to)
        import pyarrow as pa

        joined = workdir / f"joined-{events}.parquet"
        pq.write_table(pa.concat_tables([pq.read_table(f) for f in files]), joined)
        files = [joined]
    log = read_interactions(files[0], COLUMNS)
    pre, split = _pre_split()
    data = prepare_in_memory(RawLog(log.interactions, source=str(folder)), pre, split)
    with atomic_dir(cache / "data") as tmp:
        data.save(tmp)
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "train_events": len(data.train),
            "users": data.n_users, "items": data.n_items}


def stage_load(workdir: Path, events: int, cold: bool = False) -> dict:
    """Load the cache with the full check (sha256 of every byte), as a build's first load does.
    ``cold``: first evict the cache's files from the page cache, so every size reads from the disk
    (a 100M cache just written sits in memory; a 1B one, 24 GB, cannot on this machine)."""
    from rectrain.data.dataset import PreparedData

    cache = workdir / f"cache-{events}"
    (target,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    evicted = _evict_from_page_cache(target) if cold else 0
    start = time.perf_counter()
    data = PreparedData.load(target, verify=True)
    n = len(data.train) + len(data.valid) + len(data.test)
    row = {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "events": n}
    if cold:
        row["evicted_mb"] = round(evicted / 2**20)
    return row


def _evict_from_page_cache(folder: Path) -> int:
    """Drop ``folder``'s files from the page cache (posix_fadvise DONTNEED after fsync: no root, no
    other file touched); returns the bytes advised."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += path.stat().st_size
            finally:
                os.close(fd)
    return total


def stage_train(workdir: Path, events: int, model: str, steps: int, sparse: bool = False) -> dict:
    """``steps`` training steps of train.py's stack on the prepared cache; events/s over those steps.
    ``sparse``: sparse embedding gradients with LazyAdam (``model.net.sparse=true``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import torch
    from common import LEAN_OVERRIDES, compose_train_config, quiet_lightning
    from hydra.utils import instantiate

    from rectrain.training import build_net_and_task
    from common import ready_datamodule

    quiet_lightning()
    torch.set_num_threads(1)
    overrides = [*LEAN_OVERRIDES, f"model={model}", "data=interactions",
                 f"data.source.path={workdir / f'log-{events}'}", f"data.source.columns.user={COLUMNS['user']}",
                 f"data.source.columns.item={COLUMNS['item']}", f"data.source.columns.timestamp={COLUMNS['timestamp']}",
                 f"paths.cache_dir={workdir / f'cache-{events}'}", "torch_threads=1"]
    if model == "two_tower":
        overrides.append("model.loss=sampled")  # sampled softmax (in-batch + logQ)
    if sparse:
        overrides += ["model.net.sparse=true", "model.optimizer._target_=rectrain.models.optim.LazyAdam"]
    cfg = compose_train_config(overrides, workdir / f"run-{model}-{events}")
    import pytorch_lightning as pl

    class StepClock(pl.Callback):
        """Wall time at each training step's end: the rate excludes start-up and the first steps."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    start = time.perf_counter()
    datamodule = ready_datamodule(cfg)
    task = build_net_and_task(cfg, datamodule)
    setup_s = time.perf_counter() - start
    setup_mb = _peak_mb()
    clock = StepClock()
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=1,
                          limit_train_batches=steps, accelerator="cpu", devices=1, callbacks=[clock])
    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    batches = datamodule.train_batches()  # the task's own batches (its spec is set by now)
    total_steps = len(batches)
    if hasattr(batches, "targets"):  # sequences: next-item targets trained per epoch
        epoch_events = int((batches.targets >= 0).sum())
    elif model == "two_tower":  # streamed shards: every training event but each user's first is a target
        epoch_events = len(datamodule.data.train) - len(np.unique(np.asarray(datamodule.data.valid.user)))
    else:
        epoch_events = len(datamodule.data.train)
    per_step = epoch_events / max(total_steps, 1)
    warm = min(5, len(clock.times) - 2)
    timed_steps = len(clock.times) - 1 - warm
    rate = per_step * timed_steps / (clock.times[-1] - clock.times[warm])
    return {"seconds": setup_s + fit_s, "peak_mb": _peak_mb(), "setup_s": round(setup_s, 1),
            "setup_peak_mb": round(setup_mb), "timed_steps": timed_steps, "epoch_steps": total_steps,
            "events_per_step": round(per_step, 1), "events_per_s_per_core": round(rate),
            "epoch_s_extrapolated": round(epoch_events / rate)}


def stage_evaluate(workdir: Path, events: int, users: int) -> dict:
    """Full-catalog ranking (seen items excluded) of ``users`` test users, scored by popularity: the
    evaluator's own cost. The queries are lazy: each chunk of users is built (binary search in the
    user-sorted splits), ranked in blocks of bounded memory (``memory_budget_mb``), then dropped."""
    import numpy as np

    from rectrain.data.dataset import PreparedData
    from rectrain.evaluation.ranking import evaluate_ranking

    cache = workdir / f"cache-{events}"
    (target,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    data = PreparedData.load(target)
    start = time.perf_counter()
    queries = data.lazy_queries("test")
    rng = np.random.default_rng(0)
    sub = queries.select(np.sort(rng.choice(len(queries), size=min(users, len(queries)), replace=False)))
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    popularity = data.item_popularity("test").astype(np.float32)
    popularity_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_ranking(lambda q, r: np.broadcast_to(popularity, (len(r), popularity.shape[0])).copy(), sub,
                              memory_budget_mb=256)
    seconds = time.perf_counter() - start
    summary = result.summary()
    return {"seconds": seconds, "peak_mb": _peak_mb(), "queries_index_s": round(index_s, 1),
            "popularity_s": round(popularity_s, 1), "users": int(len(sub)), "of_users": int(len(queries)),
            "items": int(data.n_items), "users_per_s": round(len(sub) / seconds),
            "ndcg@10": round(float(summary["ndcg@10"]), 4)}


STAGES = {"generate", "csv", "preprocess_csv", "preprocess", "pandas", "load", "load_cold", "train_mf", "train_two_tower", "train_mf_sparse",
          "train_two_tower_sparse", "evaluate"}


def run_stage(args: argparse.Namespace, stage: str, events: int) -> dict:
    """One stage in a fresh process; returns its JSON line."""
    command = [sys.executable, __file__, "--stage", stage, "--events", str(events), "--workdir", str(args.workdir),
               "--memory-limit", args.memory_limit, "--train-steps", str(args.train_steps),
               "--eval-users", str(args.eval_users)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.items:
        command += ["--items", str(args.items)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = _cpu_wait_seconds()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    after = _cpu_wait_seconds()
    if before and after:
        row["iowait_s"], row["steal_s"] = (round(b - a, 1) for a, b in zip(before, after))
    return row


def _cpu_wait_seconds() -> tuple[float, float] | None:
    """(iowait, steal) CPU seconds of this machine since boot, summed over its cores (Linux
    /proc/stat): idle time spent waiting on the disk, and time the hypervisor gave to other
    machines. The same stage of the same code ran 20-30% slower on some runs here; these two say
    whether a figure carries a slow disk or a busy host."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[5]) / tick, int(fields[8]) / tick
    except (OSError, IndexError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="10000000", help="comma-separated log sizes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rectrain-scale"))
    parser.add_argument("--stages", default="generate,preprocess,load,train_mf,train_two_tower,evaluate")
    parser.add_argument("--compare-pandas", action="store_true", help="also run the former pandas path")
    parser.add_argument("--memory-limit", default="3GB", help="DuckDB's cap (data.engine.memory_limit)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--eval-users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=None,
                        help="catalog size of generated logs (default events/100, at most 1M)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and caches afterwards")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every size's stages this many times, the sizes taking turns (generate and "
                             "csv once); each stage's row is its median round, its seconds in every round kept")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage:  # a child: one stage, one JSON line
        events = int(args.events)
        fn = {"generate": lambda: stage_generate(args.workdir, events, items=args.items),
              "csv": lambda: stage_csv(args.workdir, events),
              "preprocess": lambda: stage_preprocess(args.workdir, events, args.memory_limit, args.threads),
              "preprocess_csv": lambda: stage_preprocess(args.workdir, events, args.memory_limit, args.threads,
                                                         csv=True),
              "pandas": lambda: stage_pandas(args.workdir, events),
              "load": lambda: stage_load(args.workdir, events),
              "load_cold": lambda: stage_load(args.workdir, events, cold=True),
              "train_mf": lambda: stage_train(args.workdir, events, "mf", args.train_steps),
              "train_two_tower": lambda: stage_train(args.workdir, events, "two_tower", args.train_steps),
              "train_mf_sparse": lambda: stage_train(args.workdir, events, "mf", args.train_steps, True),
              "train_two_tower_sparse": lambda: stage_train(args.workdir, events, "two_tower", args.train_steps,
                                                            True),
              "evaluate": lambda: stage_evaluate(args.workdir, events, args.eval_users)}[args.stage]
        with PeakWatcher(_anon_bytes, 0.2) as anon:
            row = fn()
        row["peak_anon_mb"] = round(anon.peak / 2**20)
        print(json.dumps(row, default=str))
        return
    stages = [s for s in args.stages.split(",") if s]
    if args.compare_pandas and "pandas" not in stages:
        stages.insert(stages.index("preprocess") + 1 if "preprocess" in stages else len(stages), "pandas")
    out = args.workdir / "scale.json"
    # stages of one size may run in separate invocations (a 1B log is kept with --keep, then evaluated)
    results: dict[str, dict[str, dict]] = json.loads(out.read_text()) if out.exists() else {}
    sizes = [int(e) for e in args.events.split(",")]
    rounds: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(max(args.rounds, 1)):  # the sizes take turns, so a slow spell hits each of them
        for events in sizes:
            results.setdefault(str(events), {})
            for stage in stages:
                if round_ and stage in RUN_ONCE:
                    continue
                row = run_stage(args, stage, events)
                rounds.setdefault((events, stage), []).append(row)
                results[str(events)][stage] = median_round(rounds[(events, stage)])
                print(f"{events:>13,} {stage:<16} {json.dumps(row, default=str)}", flush=True)
                out.write_text(json.dumps(results, indent=2, default=str))
            if not args.keep and round_ == max(args.rounds, 1) - 1:
                for name in (f"log-{events}", f"cache-{events}", f"cache-pandas-{events}",
                             f"joined-{events}.parquet", f"log-{events}.csv", f"cache-csv-{events}"):
                    path = args.workdir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    print_table({str(e): results[str(e)] for e in sizes})
    print_growth({str(e): results[str(e)] for e in sizes})


#: stages that make inputs, run once however many rounds
RUN_ONCE = ("generate", "csv")


def median_round(rows: list[dict]) -> dict:
    """The row of the median seconds among the rounds that succeeded (the lower of the two middle
    ones for an even count), with every round's seconds as ``rounds_s``; an error if none did."""
    done = sorted((r for r in rows if "error" not in r), key=lambda r: r["seconds"])
    if not done:
        return rows[-1]
    row = dict(done[(len(done) - 1) // 2])
    if len(rows) > 1:
        row["rounds_s"] = [round(r["seconds"], 2) if "error" not in r else "failed" for r in rows]
    return row


#: preprocessing's own stages whose growth is reported (from the pipeline's log lines); the final
#: sort's two passes are one step here, as a log under SINGLE_SORT_EVENTS needs only the second
PIPELINE_STEPS = {"dedup": ("dedup",), "k-core": ("k-core",),
                  "sort and write (blocks included)": ("write user blocks", "sort and write arrays")}

#: the issue's bound: no stage may take more than this many times longer per 10x more events
GROWTH_BOUND_PER_10X = 12.0


def growth_per_10x(seconds_a: float, seconds_b: float, events_a: int, events_b: int) -> float:
    """Time growth scaled to 10x more events: (t_b / t_a) ** (1 / log10(n_b / n_a))."""
    return (seconds_b / seconds_a) ** (1 / math.log10(events_b / events_a))


def print_growth(results: dict[str, dict[str, dict]]) -> None:
    """Per stage, and per step of preprocessing, how its seconds grow between consecutive sizes."""
    sizes = sorted(results, key=int)
    pairs = list(zip(sizes, sizes[1:]))
    if not pairs:
        return
    header = " | ".join(f"{int(a):,} -> {int(b):,}" for a, b in pairs)
    print(f"\n| growth of the seconds per 10x events | {header} |\n|---|" + "---:|" * len(pairs))
    stages = [s for s in results[sizes[0]] if all(s in results[n] for n in sizes)]
    rows: list[tuple[str, list[float | None]]] = []
    for stage in stages:
        seconds = [results[n][stage].get("seconds") for n in sizes]
        rows.append((stage, seconds))
        if stage.startswith("preprocess"):
            for step, names in PIPELINE_STEPS.items():
                steps = [results[n][stage].get("stages", {}) for n in sizes]
                rows.append((f"{stage}: {step}", [sum(st.get(k, 0.0) for k in names) or None for st in steps]))
    for name, seconds in rows:
        cells = []
        for (a, b), (ta, tb) in zip(pairs, zip(seconds, seconds[1:])):
            if not ta or not tb:
                cells.append("")
                continue
            growth = growth_per_10x(ta, tb, int(a), int(b))
            cells.append(f"{growth:.1f}x" + (f" (over {GROWTH_BOUND_PER_10X:g}x)" if growth > GROWTH_BOUND_PER_10X else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print("\n| events | stage | seconds | peak RSS MB | disk MB | notes |\n|---|---|---|---|---|---|")
    for events, stages in results.items():
        for stage, row in stages.items():
            if "error" in row:
                print(f"| {int(events):,} | {stage} | failed | | | {row['error'][:120]} |")
                continue
            disk = row.get("disk_peak_mb", row.get("disk_mb", ""))
            notes = {k: v for k, v in row.items() if k not in ("seconds", "peak_mb", "disk_peak_mb", "disk_mb")}
            if "peak_anon_mb" in row:
                notes = {"peak_anon_mb": row["peak_anon_mb"], **notes}
            if "rounds_s" in row:  # first: cut to 160 characters, the notes would lose it
                notes = {"rounds_s": row["rounds_s"], **notes}
            print(f"| {int(events):,} | {stage} | {row['seconds']:.1f} | {row['peak_mb']:,.0f} | "
                  f"{disk if disk == '' else f'{disk:,.0f}'} | {json.dumps(notes, default=str)[:160]} |")


if __name__ == "__main__":
    main()
