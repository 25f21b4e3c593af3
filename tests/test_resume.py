"""Exact resume after a crash, and safe checkpoint loading.

Each crash test SIGKILLs a training run mid-epoch (a test callback composed through Hydra, in a
forked process so torch and Lightning are not imported again), resumes it from ``last.ckpt`` into a
new run directory, as the README shows, and requires the final weights, the validation and test
metrics and the best epoch of an uninterrupted run, bit for bit. The DDP and bad-checkpoint tests
drive ``python train.py`` itself.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rectrain.checkpoints import load_checkpoint
from rectrain.training import train
from tests.conftest import ROOT, TINY_DATA

COMMON = [*TINY_DATA, "trainer.max_epochs=3", "trainer.accelerator=cpu", "logger=none", "callbacks.progress_bar=null",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.item_embeddings=null"]
SMALL_TWO_TOWER = ["model=two_tower", "model.dim=16", "model.encoder.hidden=16", "model.net.item_hidden=[16]",
                   "model.batch_size=32", "model.optimizer.lr=0.05"]
# Learning rates chosen so the best epoch (1) is not the last (2): the resumed run must carry the
# best score over, not only the weights.
FAMILIES = {
    "mf": ["model=mf", "model.dim=8", "model.optimizer.lr=0.1"],
    # dropout: NeuMF resumed exactly before only because its default dropout is 0
    "neumf": ["model=neumf", "model.dim=8", "model.net.layers=[16,8]", "model.net.dropout=0.3",
              "model.optimizer.lr=0.05"],
    "two_tower_full_dropout": [*SMALL_TWO_TOWER, "model.loss=full", "model.encoder.dropout=0.3",
                               "model.encoder.embedding_dropout=0.3", "model.net.id_dropout=0.3"],
    "two_tower_sampled": [*SMALL_TWO_TOWER, "model.loss=sampled", "model.extra_negatives=8"],
}
KILL_MID_EPOCH_2 = ["+callbacks.killer._target_=tests.resume_helpers.KillAt", "+callbacks.killer.epoch=2",
                    "+callbacks.killer.batch=1"]


def train_killed(cfg: Any) -> None:
    """Run ``train(cfg)`` in a forked child that must die by SIGKILL (its killer callback)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            train(cfg)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def run_train(run: Path, cache: Path, *overrides: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py`` in a fresh process, writing into ``run``."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run}",
                           f"paths.cache_dir={cache}", *overrides],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def completed(proc: subprocess.CompletedProcess, run: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "results.json").read_text())


def assert_same_weights(checkpoint: str | Path, reference: str | Path) -> None:
    ours, theirs = load_checkpoint(checkpoint)["state_dict"], load_checkpoint(reference)["state_dict"]
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def assert_same_run(resumed: dict, full: dict, resumed_run: Path, full_run: Path) -> None:
    """Bit-identical final weights, the same metrics and the same best epoch as the uninterrupted run."""
    assert_same_weights(resumed_run / "checkpoints" / "last.ckpt", full_run / "checkpoints" / "last.ckpt")
    assert resumed["valid"] == full["valid"]
    assert resumed["test"] == full["test"]
    assert resumed["epochs_trained"] == full["epochs_trained"]
    # the best over all epochs, as a file of the new run directory (complete on its own)
    best = Path(resumed["best_checkpoint"])
    assert best.parent == resumed_run / "checkpoints" and best.is_file()
    assert best.name == Path(full["best_checkpoint"]).name
    assert_same_weights(best, full["best_checkpoint"])


def run_dir(cfg: Any) -> Path:
    return Path(cfg.paths.output_dir)


@pytest.mark.crash
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_killed_mid_epoch_resumes_exactly(compose_cfg, tmp_path, family):
    overrides = [*COMMON, *FAMILIES[family]]
    full_cfg = compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'full'}")
    full = train(full_cfg)
    assert Path(full["best_checkpoint"]).name == "best-epoch001.ckpt", "the config no longer has its best before the end"

    killed_cfg = compose_cfg(*overrides, *KILL_MID_EPOCH_2, f"paths.output_dir={tmp_path / 'killed'}")
    train_killed(killed_cfg)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 1  # the newest finished epoch, though epoch 1 was not the best

    resumed_cfg = compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'resumed'}", f"ckpt_path={last}")
    resumed = train(resumed_cfg)
    assert_same_run(resumed, full, tmp_path / "resumed", tmp_path / "full")
