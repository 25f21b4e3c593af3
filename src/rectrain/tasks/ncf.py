"""Training NCF-family models (MF, GMF, MLP, NeuMF) from implicit feedback.

Pointwise: binary cross-entropy on each positive and ``n_negatives`` sampled negatives (NCF's
recipe). Pairwise: BPR, -log sigmoid(s(u, i+) - s(u, i-)). Both live in :mod:`rectrain.losses`.
Negatives come from the data module, redrawn every epoch, uniform or popularity^alpha, optionally
excluding the user's positives.
"""
from __future__ import annotations

import typing
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from rectrain.data.batching import PointwiseSpec
from rectrain.data.queries import RankingQueries
from rectrain.errors import ConfigError
from rectrain.losses import bce_loss, bpr_loss
from rectrain.tasks.base import RankingTask

#: the choices of ``model.loss`` (checked with the config, before any data is read)
Loss = Literal["bce", "bpr"]
LOSSES = typing.get_args(Loss)


class NCFTask(RankingTask):
    """Trains an NCF-family ``net`` (``forward(user, item)`` and ``score_all(user)``).

    Args:
        net: MF, GMF, MLP or NeuMF from ``rectrain.models.ncf``.
        loss: ``bce`` (pointwise) or ``bpr`` (pairwise).
        negatives: ``n`` per positive, ``alpha`` (0 uniform, >0 popularity^alpha),
            ``exclude_positives`` (redraw negatives the user actually consumed).
        pretrained: for NeuMF, ``{"gmf": ckpt, "mlp": ckpt, "alpha": 0.5}`` to start from trained
            GMF and MLP checkpoints as in the NCF paper.
        **kwargs: passed to :class:`RankingTask` (optimizer, scheduler, ks, ...).
    """

    def __init__(self, net: nn.Module, loss: Loss = "bce", negatives: Mapping[str, Any] | None = None,
                 pretrained: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if loss not in LOSSES:
            raise ConfigError("model.loss", f"must be one of {LOSSES}, got {loss!r}")
        negatives = dict(negatives or {})
        unknown = set(negatives) - {"n", "alpha", "exclude_positives"}
        if unknown:
            raise ConfigError(f"model.negatives.{sorted(unknown)[0]}", "unknown key; valid: n, alpha, exclude_positives")
        n = int(negatives.get("n", 4))
        if n < 1:
            raise ConfigError("model.negatives.n", f"must be >= 1, got {n}")
        self.loss_name = loss
        self._spec = PointwiseSpec(n_negatives=n, alpha=float(negatives.get("alpha", 0.0)),
                                   exclude_positives=bool(negatives.get("exclude_positives", True)),
                                   pairwise=loss == "bpr")
        if pretrained and (pretrained.get("gmf") or pretrained.get("mlp")):
            self._load_pretrained(pretrained)

    @property
    def train_spec(self) -> PointwiseSpec:
        return self._spec

    def _load_pretrained(self, pretrained: Mapping[str, Any]) -> None:
        from rectrain.runs import load_checkpoint

        if not hasattr(self.net, "load_pretrained"):
            raise ConfigError("model.pretrained", f"{type(self.net).__name__} cannot be initialised from GMF/MLP")
        if not (pretrained.get("gmf") and pretrained.get("mlp")):
            raise ConfigError("model.pretrained", "give both model.pretrained.gmf and model.pretrained.mlp")
        states = {}
        for part in ("gmf", "mlp"):
            ckpt = load_checkpoint(pretrained[part])
            states[part] = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        self.net.load_pretrained(states["gmf"], states["mlp"], float(pretrained.get("alpha", 0.5)))

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if self._spec.pairwise:
            loss = bpr_loss(self.net(batch["user"], batch["pos_item"]), self.net(batch["user"], batch["neg_item"]))
        else:
            loss = bce_loss(self.net(batch["user"], batch["item"]), batch["label"])
        return loss, batch["user"].numel()

    def check_privacy(self) -> None:
        super().check_privacy()
        if self._spec.alpha != 0.0:
            raise ConfigError("model.negatives.alpha", "popularity-weighted negatives read every user's events "
                              "outside the privacy accounting; use 0 (uniform) with privacy=dp")

    def record_loss(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        # one user's record: user (), items (T,), weight (T,) 0 on padding (rectrain.data.records)
        weight = record["weight"]
        if self._spec.pairwise:
            user = record["user"].expand_as(record["pos_item"])
            return bpr_loss(self.net(user, record["pos_item"]), self.net(user, record["neg_item"]), weight)
        user = record["user"].expand_as(record["item"])
        return bce_loss(self.net(user, record["item"]), record["label"], weight)

    def score_queries(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        users = torch.as_tensor(queries.users[rows], device=self.device)
        return self.net.score_all(users)
