"""Two-tower training throughput on ml-100k: sequences/s, targets/s, epoch seconds, batch-building share.

The task is built from ``conf/experiment/ml100k_two_tower.yaml`` (the tuned settings) exactly as
``train.py`` builds it, and trained with ``Trainer.fit`` (``conf/trainer/default.yaml``) for
``--epochs`` epochs with validation disabled (``limit_val_batches=0``), no logger, no checkpointing,
no progress bar. The first epoch is a warm-up and not timed; figures are medians over the rest.

* **sequences**: training windows per epoch (``SequenceBatches`` rows: each user's history cut into
  windows of ``max_length`` with the configured stride); **targets**: next-item predictions trained
  per epoch (every event after a user's first, once);
* **batch building**: one epoch of iterating the data module's ``SequenceBatches`` alone (shuffle,
  index, trim padding) and the same through the ``DataLoader`` Lightning uses, divided by the epoch
  time: the share of an epoch spent producing batches.

Runs once per ``--threads`` value (default 1 and 2) in the same process. On a shared 2-core machine
two threads can be far slower than one (oversubscription): compare the rows, do not sum them.

    python bench/two_tower_speed.py [--data ../shared/data/ml-100k] [--threads 1,2] [--epochs 3]
        [--experiment ml100k_two_tower] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ready_datamodule,
    DEFAULT_DATA,
    LEAN_OVERRIDES,
    TrainEpochTimer,
    compose_train_config,
    quiet_lightning,
    require_dataset,
)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from rectrain.training import build_net_and_task  # noqa: E402


def build_epoch(batches, epoch: int) -> float:
    start = time.perf_counter()
    batches.set_epoch(epoch)
    for _ in batches:
        pass
    return time.perf_counter() - start


def loader_epoch(datamodule, epoch: int) -> float:
    start = time.perf_counter()
    datamodule.train_batches().set_epoch(epoch)
    for _ in datamodule.train_dataloader():
        pass
    return time.perf_counter() - start


def measure(threads: int, args: argparse.Namespace, tmp: Path) -> dict:
    torch.set_num_threads(threads)
    cfg = compose_train_config([*LEAN_OVERRIDES, f"experiment={args.experiment}", f"data.source.root={args.data}",
                                f"paths.cache_dir={tmp / 'cache'}", f"torch_threads={threads}", *args.set],
                               tmp / f"threads{threads}")
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = ready_datamodule(cfg)
    task = build_net_and_task(cfg, datamodule)
    timer = TrainEpochTimer()
    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          num_sanity_val_steps=0, max_epochs=args.epochs, accelerator="cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    batches = datamodule.train_batches()
    sequences = int(batches.lengths.numel())
    targets = int((batches.targets >= 0).sum())
    steps = len(batches)
    build_s = statistics.median(build_epoch(batches, 100 + e) for e in range(3))
    loader_s = statistics.median(loader_epoch(datamodule, 200 + e) for e in range(3))
    epoch_s = statistics.median(timer.train_seconds[1:] or timer.train_seconds)
    return {"threads": threads, "sequences": sequences, "targets": targets, "steps": steps, "epoch_s": epoch_s,
            "all_epochs": timer.train_seconds, "build_s": build_s, "loader_s": loader_s, "fit_s": fit_seconds,
            "spec": task.train_spec, "batch_size": datamodule.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is not timed)")
    parser.add_argument("--experiment", default="ml100k_two_tower")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.data = args.data.resolve()
    require_dataset(args.data / "u.data", "ml-100k")
    quiet_lightning()

    with tempfile.TemporaryDirectory() as tmp_name:
        rows = [measure(int(t), args, Path(tmp_name)) for t in args.threads.split(",")]

    spec = rows[0]["spec"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ml-100k two-tower training (experiment={args.experiment}: max_length {spec.max_length}, stride "
          f"{spec.stride}, {rows[0]['batch_size']} sequences/step): {rows[0]['sequences']} sequences, "
          f"{rows[0]['targets']} targets, {rows[0]['steps']} steps per epoch; Lightning fit, no validation; "
          f"median of epochs 2..{args.epochs}; torch {torch.__version__}, {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} cores (shared; 1-min load average at the end {load:.1f})\n")
    print("| torch threads | epoch s | sequences/s | targets/s | batch building s (share) | through DataLoader s "
          "(share) | all epochs s |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['epoch_s']:.2f} | {r['sequences'] / r['epoch_s']:.0f} | "
              f"{r['targets'] / r['epoch_s']:.0f} | {r['build_s']:.3f} ({r['build_s'] / r['epoch_s']:.1%}) | "
              f"{r['loader_s']:.3f} ({r['loader_s'] / r['epoch_s']:.1%}) | "
              f"{', '.join(f'{s:.1f}' for s in r['all_epochs'])} |")
    print("\nFor comparison (../shared/data/README.md): RecBole GRU4Rec 77 s and SASRec 122 s per epoch on ml-100k "
          "(97,171 prefix samples, 2 threads); official GRU4Rec 6-8k events/s on yoochoose (1 thread).")


if __name__ == "__main__":
    main()
