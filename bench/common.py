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
