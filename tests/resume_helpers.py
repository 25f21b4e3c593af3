"""Test-only callbacks composed into a real ``train.py`` run through Hydra (``+callbacks.x._target_=...``).

They crash a run at an exact point, or draw from the global random generators, so the resume tests
are deterministic without any switch in the production code.
"""
from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


class KillAt(pl.Callback):
    """SIGKILL the process when training batch ``batch`` of epoch ``epoch`` starts.

    With ``batch >= 1`` the previous step of that epoch has already changed the weights in memory,
    so nothing after the last checkpoint survives: a resume must redo the epoch from ``last.ckpt``.
    """

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillOnSave(pl.Callback):
    """SIGKILL the process as the ``nth`` checkpoint of epoch ``epoch`` is being assembled (1-based).

    ``on_save_checkpoint`` runs before the file is written, so the kill falls between two checkpoint
    writes of one epoch: with an improved epoch, nth=2 is after the new best and before ``last.ckpt``.
    """

    def __init__(self, epoch: int, nth: int) -> None:
        self.epoch, self.nth, self.seen = epoch, nth, 0

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.current_epoch == self.epoch:
            self.seen += 1
            if self.seen == self.nth:
                os.kill(os.getpid(), signal.SIGKILL)


class GlobalRandomNoise(pl.Callback):
    """Nudges the weights at each epoch start by draws from the global torch, numpy and ``random``
    generators, the way a user's code outside rectrain's seeded window would use them; the final
    weights then depend on all three streams continuing across a resume."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            param = next(pl_module.parameters())
            noise = torch.randn(param.shape) * 1e-3 + float(np.random.randn()) * 1e-3 + random.random() * 1e-3
            param.add_(noise.to(param.device, param.dtype))
