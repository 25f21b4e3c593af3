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

from rectrain.runs import load_checkpoint
from rectrain.training import train
from tests.conftest import ROOT, TINY_DATA

COMMON = [*TINY_DATA, "trainer.max_epochs=3", "trainer.accelerator=cpu", "logger=none", "callbacks.progress_bar=null",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.item_embeddings=null"]
SMALL_TWO_TOWER = ["model=two_tower", "model.dim=16", "model.net.hidden=16", "model.net.item_hidden=[16]",
                   "data.batch_size=32", "model.optimizer.lr=0.05"]
# Learning rates chosen so the best epoch (1) is not the last (2): the resumed run must carry the
# best score over, not only the weights. MF may run 4 epochs but early stopping (patience 1) ends it
# after epoch 2, in the resumed run only if its state was carried over too.
FAMILIES = {
    "mf": ["model=mf", "model.dim=8", "model.optimizer.lr=0.1", "trainer.max_epochs=4",
           "callbacks.early_stopping.patience=1"],
    # dropout: NeuMF resumed exactly before only because its default dropout is 0
    "neumf": ["model=neumf", "model.dim=8", "model.net.layers=[16,8]", "model.net.dropout=0.3",
              "model.optimizer.lr=0.05"],
    "two_tower_full_dropout": [*SMALL_TWO_TOWER, "model.loss=full", "model.net.dropout=0.3",
                               "model.net.embedding_dropout=0.3", "model.net.id_dropout=0.3"],
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
    # last.ckpt is a real file of the newest epoch, not a copy or link of the best
    last = resumed_run / "checkpoints" / "last.ckpt"
    assert not last.is_symlink() and load_checkpoint(last)["epoch"] == resumed["epochs_trained"] - 1
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
    assert full["epochs_trained"] == 3  # for MF: stopped early (max_epochs=4)

    killed_cfg = compose_cfg(*overrides, *KILL_MID_EPOCH_2, f"paths.output_dir={tmp_path / 'killed'}")
    train_killed(killed_cfg)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 1  # the newest finished epoch, though epoch 1 was not the best

    resumed_cfg = compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'resumed'}", f"ckpt_path={last}")
    resumed = train(resumed_cfg)
    assert_same_run(resumed, full, tmp_path / "resumed", tmp_path / "full")


@pytest.mark.crash
def test_killed_between_the_best_and_last_checkpoint_writes(compose_cfg, tmp_path):
    """A kill after epoch 1's new best is written but before its last.ckpt: the previous best, which
    last.ckpt still names, must still exist, and the resume must still repeat the full run."""
    overrides = [*COMMON, *FAMILIES["neumf"]]
    full = train(compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'full'}"))
    train_killed(compose_cfg(*overrides, "+callbacks.killer._target_=tests.resume_helpers.KillOnSave",
                             "+callbacks.killer.epoch=1", "+callbacks.killer.nth=2",
                             f"paths.output_dir={tmp_path / 'killed'}"))
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "best-epoch001.ckpt").is_file()  # the kill fell between the two writes
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["epoch"] == 0
    named_best = next(v["best_model_path"] for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(named_best).is_file()

    resumed = train(compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'resumed'}",
                                f"ckpt_path={checkpoints / 'last.ckpt'}"))
    assert_same_run(resumed, full, tmp_path / "resumed", tmp_path / "full")


@pytest.mark.crash
def test_global_random_streams_continue_across_a_resume(compose_cfg, tmp_path):
    """Code outside rectrain's seeded epochs drawing from torch, numpy and ``random`` (a user's
    callback) gets the same numbers after a resume: every stream is in the checkpoint."""
    overrides = [*COMMON, *FAMILIES["mf"], "+callbacks.noise._target_=tests.resume_helpers.GlobalRandomNoise"]
    full = train(compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'full'}"))
    train_killed(compose_cfg(*overrides, *KILL_MID_EPOCH_2, f"paths.output_dir={tmp_path / 'killed'}"))
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = train(compose_cfg(*overrides, f"paths.output_dir={tmp_path / 'resumed'}", f"ckpt_path={last}"))
    assert_same_run(resumed, full, tmp_path / "resumed", tmp_path / "full")


@pytest.mark.crash
def test_checkpoint_write_killed_midway_leaves_the_previous_file(compose_cfg, tmp_path):
    """SIGKILL while a checkpoint's bytes are being written: the old last.ckpt stays whole, and the
    torn temporary is debris that the next run in that directory removes."""
    import io

    import lightning_fabric.plugins.io.torch_io as torch_io

    from rectrain.tasks.callbacks import SafeCheckpointIO

    checkpoints = tmp_path / "run" / "checkpoints"
    plugin, target = SafeCheckpointIO(), checkpoints / "last.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, target)
    pid = os.fork()
    if pid == 0:
        try:
            def torn_write(checkpoint: dict, path: Any) -> None:  # half the bytes, then killed
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                with open(path, "wb") as fh:
                    fh.write(buffer.getvalue()[: buffer.tell() // 2])
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch_io._atomic_save = torn_write
            plugin.save_checkpoint({"state_dict": {"w": torch.ones(10_000)}, "epoch": 1}, target)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    assert load_checkpoint(target)["epoch"] == 0
    debris = [p for p in checkpoints.iterdir() if p != target]
    assert len(debris) == 1 and debris[0].stat().st_size > 0

    train(compose_cfg(*COMMON, *FAMILIES["mf"], "trainer.max_epochs=1", "test=false",
                      f"paths.output_dir={tmp_path / 'run'}"))
    assert not debris[0].exists()
    assert not [p for p in checkpoints.iterdir() if "tmp" in p.name]


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickle_payload_checkpoint_is_refused_not_run(tmp_path):
    marker, hostile = tmp_path / "payload-ran", tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": Payload(marker)}, hostile)
    run = tmp_path / "run"
    # torch's pre-2.6 default: every torch.load without an explicit weights_only unpickles anything
    proc = run_train(run, tmp_path / "cache", "model=mf", "model.dim=8", f"ckpt_path={hostile}",
                     env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hostile.ckpt" in errors[0] and "refused" in errors[0], proc.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["status"] == "failed"
    # the payload is live: an unsafe load does run it
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_one_clear_error(compose_cfg, tmp_path):
    from rectrain.errors import RectrainError

    first = train(compose_cfg(*COMMON, *FAMILIES["mf"], "trainer.max_epochs=1", "test=false",
                              f"paths.output_dir={tmp_path / 'first'}"))
    blob = Path(first["best_checkpoint"]).read_bytes()
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RectrainError, match="torn.ckpt: not a loadable rectrain checkpoint") as info:
        train(compose_cfg(*COMMON, *FAMILIES["mf"], f"paths.output_dir={tmp_path / 'second'}", f"ckpt_path={torn}"))
    assert "\n" not in str(info.value)


DDP = ["trainer=ddp", "trainer.devices=2", *FAMILIES["two_tower_full_dropout"], "data.batch_size=8"]  # 4 steps per rank


@pytest.mark.slow
@pytest.mark.crash
def test_ddp_killed_mid_epoch_resumes_exactly(tmp_path):
    """Two gloo processes, each with its own data shard and random state, killed together."""
    cache = tmp_path / "cache"
    reference = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *COMMON, *DDP,
                                  f"hydra.run.dir={tmp_path / 'full'}", f"paths.cache_dir={cache}"],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
    try:
        killed = run_train(tmp_path / "killed", cache, *DDP, *KILL_MID_EPOCH_2)
        _, reference_err = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
    assert reference.returncode == 0, reference_err[-3000:]
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 1
    assert len(next(v for k, v in load_checkpoint(last)["callbacks"].items() if k == "RandomStateCheckpoint")["ranks"]) == 2

    resumed_run = tmp_path / "resumed"
    resumed = completed(run_train(resumed_run, cache, *DDP, f"ckpt_path={last}"), resumed_run)
    assert_same_run(resumed, full, resumed_run, tmp_path / "full")
