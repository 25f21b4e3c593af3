"""Helpers shared by the bench scripts: locating the shared datasets, timing, tables."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("RECTRAIN_BENCH_DATA", ROOT.parent / "shared" / "data"))


def require_dataset(path: Path, what: str) -> Path:
    """Exit with a clear message (status 0: nothing to measure) when a benchmark dataset is absent."""
    if not path.exists():
        print(f"skipped: {what} not found at {path}. Put the files there or set RECTRAIN_BENCH_DATA "
              f"to the folder holding it (see README, 'Benchmarks').")
        sys.exit(0)
    return path


def start_seeded_bench(args, required: str, what: str) -> list[int]:
    """The common start of a multi-seed bench: resolve ``args.data``, skip when ``required`` is
    missing there, fix torch's intra-op threads, quiet Lightning; returns the seeds of ``args.seeds``."""
    import torch

    args.data = args.data.resolve()
    require_dataset(args.data / required, what)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    return [int(s) for s in args.seeds.split(",")]


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start


# --- composing the real training config (the NCF benches) --------------------------------------
CONF_DIR = ROOT / "conf"

#: what a measurement run does not need: loggers, the projector, the LR monitor, progress output.
LEAN_OVERRIDES = (
    "logger=none",
    "callbacks.item_embeddings=null",
    "callbacks.lr_monitor=null",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
)


def compose_train_config(overrides: list[str] | tuple[str, ...], output_dir: str | Path):
    """conf/train.yaml composed with ``overrides`` (as on the command line), writing under ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])
    finally:
        GlobalHydra.instance().clear()


def quiet_lightning() -> None:
    """Silence Lightning's per-run info lines and known-harmless warnings (tables stay readable)."""
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (it sets its loggers' levels on import: import first)

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "rectrain"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")


# --- two-tower benches: epoch timing inside rectrain.training.train, mean ± sd ---------------------
ENCODER_NAMES = {"gru": "GRU", "lstm": "LSTM", "transformer": "transformer"}


def encoder_name(cfg) -> str:
    """The query tower of a composed two-tower config, as the tables name it (GRU, LSTM, transformer)."""
    cell = str(cfg.model.net.cell)
    return ENCODER_NAMES.get(cell, cell)


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± sample sd`` (just the value for a single run)."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _lightning_callback_base():
    import pytorch_lightning as pl

    return pl.Callback


class TrainEpochTimer(_lightning_callback_base()):
    """Wall seconds of each training epoch *without* its validation, and of each validation.

    Usable from a composed config (``+callbacks.epoch_timer._target_=common.TrainEpochTimer`` with
    bench/ on ``sys.path``); every instance appends to the class-level ``runs`` list, so a bench
    reads ``TrainEpochTimer.runs[-1]`` after ``train(cfg)``.
    """

    runs: list["TrainEpochTimer"] = []

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.valid_seconds: list[float] = []
        self._start = 0.0
        self._in_epoch = False
        TrainEpochTimer.runs.append(self)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._in_epoch = time.perf_counter(), True

    def _close_train(self) -> None:
        if self._in_epoch:
            self.train_seconds.append(time.perf_counter() - self._start)
            self._in_epoch = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_train()  # validation at the end of an epoch: the training part is over
        self._valid_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.valid_seconds.append(time.perf_counter() - self._valid_start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close_train()


def ready_datamodule(cfg):
    """The data module of a composed config, prepared (from the cache when it exists) and set up."""
    from rectrain.training import build

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def trained_net(results: dict):
    """(net, prepared data) of a finished run: its best checkpoint opened as a run (rectrain.runs), the
    data rebuilt from the checkpoint's config and checked to be the training data."""
    from rectrain.runs import open_run

    run = open_run(results["best_checkpoint"])
    return run.net, run.data()
