"""Training the two-tower model as next-item prediction over padded sequences.

Every valid position of every sequence is a training example (or only the last one), all in one
batched RNN pass: no Python loop over positions or users. Loss choices:

* ``full``: softmax over the whole catalog (exact; the default when the catalog fits);
* ``sampled``: in-batch negatives (the other examples' targets) plus ``extra_negatives`` shared
  negatives drawn from popularity^alpha, with logQ correction and accidental-hit masking;
* ``bpr_max``: GRU4Rec's BPR-max over the same sampled candidates.
"""
from __future__ import annotations

import typing
from typing import Any, Literal

import numpy as np
import torch

from rectrain.data.batching import NegativeSampler, SequenceSpec
from rectrain.data.queries import RankingQueries, pad_histories
from rectrain.errors import ConfigError
from rectrain.evaluation.ranking import evaluate_ranking
from rectrain.losses import (
    bpr_max_loss,
    candidate_logits,
    expected_count_log_q,
    full_softmax_loss,
    sampled_softmax_loss,
)
from rectrain.models.two_tower import TwoTower
from rectrain.tasks.base import RankingTask

#: the choices of ``model.loss`` and ``model.positions`` (checked with the config, before any data is read)
Loss = Literal["full", "sampled", "bpr_max"]
Positions = Literal["all", "last"]
LOSSES = typing.get_args(Loss)


def padded_histories(queries: RankingQueries, rows: np.ndarray, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``max_length`` history items of each query row, right-padded, and their lengths,
    as tensors (see :func:`rectrain.data.queries.pad_histories`)."""
    items, lengths = pad_histories(queries.history_indptr, queries.history_items, rows, max_length)
    return torch.from_numpy(items), torch.from_numpy(lengths)


class TwoTowerTask(RankingTask):
    """Trains :class:`TwoTower` on next-item prediction.

    Args:
        net: the two-tower model.
        loss: ``full``, ``sampled`` or ``bpr_max``.
        positions: ``all`` (every position of each sequence is an example) or ``last``.
        logq_correction: subtract log expected candidate counts (sampled losses).
        extra_negatives: shared negatives per step from popularity^``alpha`` (sampled losses).
        alpha: popularity exponent of the extra negatives (0 uniform).
        bpr_max_regularization: the score regulariser of BPR-max.
        stride: start a training window every ``stride`` events of a long history (None: windows
            do not overlap); smaller strides give late events more context at more compute.
        tune_repeat_boost: candidate boosts of the last history item's repeat score; before every
            validation the one with the best validation MRR@ks[0] is kept (None: no tuning). The
            learned repeat bonus maximises likelihood; ranking the last item first more often can
            rank better than likelihood suggests (click sessions), and this is chosen on validation
            like any hyperparameter, never on test. Needs ``model.net.repeat_slots > 0``.
        tune_queries: validation queries used for that choice (a seeded sample when there are more).
        **kwargs: passed to :class:`RankingTask` (optimizer, scheduler, ks, seed, ...).
    """

    def __init__(self, net: TwoTower, loss: Loss = "full", positions: Positions = "all", logq_correction: bool = True,
                 extra_negatives: int = 0, alpha: float = 0.0, bpr_max_regularization: float = 1.0,
                 stride: int | None = None,
                 tune_repeat_boost: list[float] | None = None, tune_queries: int = 20000, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if loss not in LOSSES:
            raise ConfigError("model.loss", f"must be one of {LOSSES}, got {loss!r}")
        if positions not in ("all", "last"):
            raise ConfigError("model.positions", f"must be 'all' or 'last', got {positions!r}")
        if extra_negatives < 0:
            raise ConfigError("model.extra_negatives", "must be >= 0")
        if loss != "full" and getattr(net, "repeat_switch", None) is not None:
            raise ConfigError("model.net.repeat_mode", "'mixture' needs the full softmax (model.loss=full): its "
                              "repeat/explore split is a probability over the whole catalog")
        self.loss_name, self.positions = loss, positions
        self.logq_correction, self.extra_negatives, self.alpha = logq_correction, extra_negatives, alpha
        self.bpr_max_regularization = bpr_max_regularization
        if tune_repeat_boost and net.repeat_bonus is None:
            raise ConfigError("model.tune_repeat_boost", "needs a repeat bonus (model.net.repeat_slots > 0)")
        self.tune_repeat_boost = [float(b) for b in tune_repeat_boost] if tune_repeat_boost else None
        self.tune_queries = tune_queries
        self.stride = stride
        self._sampler: NegativeSampler | None = None
        self._generator: torch.Generator | None = None
        self._cached_item_vectors: torch.Tensor | None = None
        # (n_users, F) encoded user features, looked up per batch; a plain attribute, not a buffer,
        # so no user's attributes end up in a checkpoint
        self._user_features: torch.Tensor | None = None
        self.register_buffer("unigram", torch.full((net.n_items,), 1.0 / net.n_items), persistent=False)

    @property
    def train_spec(self) -> SequenceSpec:
        # sequences per step: data.batch_size (its one home; conf/model/two_tower.yaml sets its default)
        return SequenceSpec(max_length=self.net.max_length, stride=self.stride)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule.data
        counts = np.bincount(data.train.item, minlength=data.n_items).astype(np.float64) + 1e-3
        self.unigram.copy_(torch.from_numpy(counts / counts.sum()))
        if self.extra_negatives:
            self._sampler = NegativeSampler(data.n_items, counts, self.alpha)
        if self.net.n_user_features:
            matrix = self.trainer.datamodule.user_feature_matrix()
            if matrix.shape[1] != self.net.n_user_features:
                raise ConfigError("data.user_features", f"encode to {matrix.shape[1]} values, but the model was "
                                  f"built for {self.net.n_user_features}")
            self._user_features = torch.from_numpy(matrix)

    def user_features_of(self, users: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        """(B, F) features of user indices ``users`` on this task's device; None for a model without them."""
        if not self.net.n_user_features:
            return None
        if self._user_features is None or users is None:
            raise RuntimeError("this model reads user features: train it through the data module "
                               "(data.user_features) so every batch carries its users")
        if self._user_features.device != self.device:
            self._user_features = self._user_features.to(self.device)
        return self._user_features[torch.as_tensor(users, device=self.device)]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._generator = torch.Generator().manual_seed(self.seed * 7919 + self.current_epoch)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        items, lengths, targets = batch["items"], batch["lengths"], batch["targets"]  # (B, L), (B,), (B, L)
        queries = self.net.query_all_positions(items, self.user_features_of(batch.get("users")))  # (B, L, d)
        if self.positions == "last":
            mask = torch.zeros_like(targets, dtype=torch.bool)
            mask[torch.arange(items.shape[0], device=items.device), lengths - 1] = True
        else:
            mask = targets >= 0
        q, t = queries[mask], targets[mask]  # (N, d), (N,)
        rows, positions = mask.nonzero(as_tuple=True)  # in the same order as queries[mask]
        # the example at (b, p) has read items[b, :p+1]: history position j is p - j behind it
        back = positions.view(-1, 1) - torch.arange(items.shape[1], device=items.device).view(1, -1)  # (N, L)
        if self.loss_name == "full":
            logits = self.net.history_scores(q, self.net.item_vectors(), items[rows], back)  # (N, I)
            loss = full_softmax_loss(logits, t)
        else:
            history = None
            if self.net.repeat_bonus is not None:
                history = (items[rows], self.net._bonus_by_distance(back, q))
            loss = self._sampled_loss(q, t, history)
        return loss, int(t.numel())

    def check_privacy(self) -> None:
        super().check_privacy()
        if self.loss_name != "full":
            raise ConfigError("model.loss", f"{self.loss_name!r} scores each example against the other users' "
                              "targets and popularity (not one user's data): use model.loss=full with privacy=dp")
        if self.tune_repeat_boost:
            raise ConfigError("model.tune_repeat_boost", "chooses a setting on the users' validation events, "
                              "outside the privacy accounting: leave it null with privacy=dp")

    def record_loss(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        # one user's record: items (K, L), lengths (K,), targets (K, L) (-1: no target), users ()
        items, lengths, targets = record["items"], record["lengths"], record["targets"]
        k, length = items.shape
        user = record.get("users")
        features = self.user_features_of(user.expand(k)) if user is not None and self.net.n_user_features else None
        q = self.net.query_all_positions(items, features).reshape(k * length, -1)  # (K*L, d)
        rows = torch.arange(k, device=items.device).repeat_interleave(length)  # (K*L,) window of each position
        positions = torch.arange(length, device=items.device).repeat(k)  # (K*L,)
        back = positions.view(-1, 1) - torch.arange(length, device=items.device).view(1, -1)  # (K*L, L)
        logits = self.net.history_scores(q, self.net.item_vectors(), items[rows], back)  # (K*L, I)
        t = targets.reshape(-1)
        valid = t >= 0
        if self.positions == "last":
            valid = valid & (positions == lengths[rows] - 1)
        return full_softmax_loss(logits, t.clamp(min=0), valid.to(logits.dtype))

    def _sampled_loss(self, q: torch.Tensor, t: torch.Tensor,
                      history: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        candidates = t
        if self.extra_negatives and self._sampler is not None:
            gen = self._generator or torch.Generator().manual_seed(self.seed)
            extra = self._sampler.sample((self.extra_negatives,), gen).to(t.device)
            candidates = torch.cat([t, extra])
        log_q = None
        if self.logq_correction:
            extra_p = self._sampler.probabilities.to(q.device, q.dtype) if self._sampler is not None else None
            log_q = expected_count_log_q(candidates, t.numel(), self.unigram.to(q.dtype),
                                         candidates.numel() - t.numel(), extra_p)
        logits = candidate_logits(q, t, candidates, self.net.item_vectors(candidates), log_q, self.net.temperature,
                                  history)
        if self.loss_name == "bpr_max":
            return bpr_max_loss(logits, self.bpr_max_regularization)
        return sampled_softmax_loss(logits)

    # --- evaluation ---------------------------------------------------------------------------
    def _item_vectors_for_eval(self) -> torch.Tensor:
        if self._cached_item_vectors is None:
            self._cached_item_vectors = self.net.item_vectors()
        return self._cached_item_vectors

    def on_validation_epoch_start(self) -> None:
        self._cached_item_vectors = None  # weights changed since the last evaluation
        if self.tune_repeat_boost:
            self._tune_repeat_boost()

    def _tune_repeat_boost(self) -> None:
        """Keep the candidate boost with the best validation MRR@ks[0] (ties: the smallest)."""
        queries = self.trainer.datamodule.queries("valid")
        rows = np.arange(len(queries))
        if rows.size > self.tune_queries:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.tune_queries, replace=False))
        sample = queries.subset(rows)
        items, lengths = padded_histories(sample, np.arange(len(sample)), self.net.max_length)
        items, lengths = items.to(self.device), lengths.to(self.device)
        q = self.net.query(items, lengths, self.user_features_of(sample.users))  # once, for every candidate
        vectors = self._item_vectors_for_eval()
        k = self.ks[0]

        def score(_: RankingQueries, chunk: np.ndarray) -> torch.Tensor:
            at = torch.from_numpy(chunk).to(self.device)
            return self.net.score_histories(q[at], vectors, items[at], lengths[at])

        best, best_mrr = 0.0, -1.0
        for boost in sorted(self.tune_repeat_boost):
            self.net.repeat_boost.fill_(boost)
            mrr = evaluate_ranking(score, sample, (k,), memory_budget_mb=self.eval_memory_mb,
                                   device=self.device).summary()[f"mrr@{k}"]
            if mrr > best_mrr:
                best, best_mrr = boost, mrr
        self.net.repeat_boost.fill_(best)
        self.log("val/repeat_boost", best, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self._cached_item_vectors = None

    def score_queries(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        items, lengths = padded_histories(queries, rows, self.net.max_length)
        items, lengths = items.to(self.device), lengths.to(self.device)
        q = self.net.query(items, lengths, self.user_features_of(queries.users[rows]))  # (B, d)
        return self.net.score_histories(q, self._item_vectors_for_eval(), items, lengths)  # (B, I)
