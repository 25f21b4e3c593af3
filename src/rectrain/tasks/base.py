"""What every rectrain task shares: full-catalog evaluation in the Lightning loops, optimisers,
reproducible epochs and the facts a checkpoint must carry.

A subclass says how to train (``training_step``), which batches it needs (``train_spec``) and how
to score the catalog for evaluation queries (``score_queries``); evaluation, logging and
checkpoint metadata are done here once for all models.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

import rectrain
from rectrain.data.records import UserRecordSpec
from rectrain.errors import ConfigError
from rectrain.data.queries import RankingQueries
from rectrain.evaluation.ranking import RankingResult, evaluate_ranking

STAGE_PREFIX = {"valid": "val", "test": "test"}

# Evaluation metrics are gathered across ranks and merged before logging (see _finish_evaluation),
# so every rank logs the same value; Lightning's advice to average them with sync_dist does not apply.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level in distributed")


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class RankingTask(pl.LightningModule):
    """Base LightningModule: trains ``net`` and evaluates it by full-catalog ranking.

    Args:
        net: the plain ``nn.Module`` being trained (kept as ``self.net``; export uses it alone).
        optimizer: a partial optimiser (Hydra ``_partial_: true``) taking the parameters.
        scheduler: optional partial LR scheduler taking the optimiser.
        ks: ranking cut-offs evaluated and logged.
        eval_memory_mb: memory budget of the evaluator's chunks.
        seed: seeds each epoch's dropout so a resumed run repeats an uninterrupted one.
        gradient_clip: clip the gradient norm to this (None: no clipping).

    The optimisation step is written out (Lightning's manual optimisation): zero, backward, clip,
    step. It is what automatic optimisation does, without its per-step closure machinery, which
    cost 10-20% of a small model's CPU throughput (bench/ncf_speed.py).
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, ks: tuple[int, ...] | list[int] = (10, 20),
                 eval_memory_mb: float = 256, seed: int = 0, gradient_clip: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gradient_clip = gradient_clip
        self.net = net
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.ks = tuple(int(k) for k in ks)
        self.eval_memory_mb = eval_memory_mb
        self.seed = seed
        self._eval_results: list[RankingResult] = []
        self.final_metrics: dict[str, dict[str, float]] = {}
        # set by rectrain.training for privacy=dp (a rectrain.privacy.UserLevelDP); None: ordinary training
        self.privacy: Any = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this one string attribute around every hook call, about 30 times a step;
        # nn.Module.__setattr__'s parameter/buffer/module bookkeeping (needless for a str) made
        # that 100-300 us of a 5 ms MF step (bench/ncf_speed.py). Same effect, plain attribute.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # --- what subclasses provide --------------------------------------------------------------
    @property
    def train_spec(self) -> Any:
        raise NotImplementedError

    def score_queries(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), n_items) scores for evaluation queries ``rows``."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(mean loss, number of examples) of one training batch."""
        raise NotImplementedError

    def record_loss(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of one user's record (a row of ``rectrain.data.records`` batches, no batch dim).

        Called under ``torch.func.vmap`` for user-level DP: no data-dependent shapes (mask with
        weights, never index with a boolean mask).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot train with user-level DP")

    def check_privacy(self) -> None:
        """Raise a ConfigError for settings that would read other users' data inside a user's record."""
        if self.gradient_clip:
            raise ConfigError("model.gradient_clip", "privacy=dp clips each user's gradient (privacy.max_grad_norm); "
                              "leave model.gradient_clip null")

    # --- training -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            spec = self.train_spec
            if self.privacy is not None:  # one row per user, Poisson-sampled (rectrain.data.records)
                settings = self.privacy.settings
                spec = UserRecordSpec(spec, self.privacy.sample_rate, settings.events_per_user,
                                      settings.windows_per_user)
            datamodule.train_spec = spec

    def on_train_epoch_start(self) -> None:
        # Same randomness per epoch whether or not the run was resumed: the batches are seeded by
        # (seed, epoch) in the data module, dropout by this. Nothing may draw from the global RNG
        # between here and the first step in one run but not in another: the data module's loaders
        # have their own generators because Lightning creates the training iterator before this
        # hook on the first epoch of a (resumed) run and after it on later epochs.
        torch.manual_seed(self.seed * 1000 + self.current_epoch)
        self.trainer.datamodule.train_batches().set_epoch(self.current_epoch)
        self._loss_sum, self._loss_count = torch.zeros((), device=self.device), 0

    def track_loss(self, loss: torch.Tensor, n: int) -> None:
        """Accumulate the epoch loss on the device; check and log it only on logging steps.

        Reading a loss value forces a host-device sync, so a per-step ``self.log`` and finiteness
        check cost GPU throughput. A diverged run still stops within ``log_every_n_steps`` steps
        (and evaluation refuses NaN scores).
        """
        self._loss_sum += loss.detach() * n
        self._loss_count += n
        if (self.global_step + 1) % max(int(self.trainer.log_every_n_steps), 1) == 0:
            self.check_finite(loss)
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.privacy is not None:
            return self._private_step(batch)
        loss, n = self.compute_loss(batch)
        self.track_loss(loss, n)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        return loss

    def _private_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DP-SGD step: per-user gradients (torch.func), then Opacus's DPOptimizer clips each user's,
        sums, adds noise, divides by the expected users per step and counts the step in the accountant."""
        from rectrain.privacy import per_user_gradients

        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        grads, losses = per_user_gradients(self.net, self.record_loss, batch)
        for name, param in self.named_parameters():
            if param.requires_grad:
                param.grad_sample = grads[name]
        loss = losses.mean() if losses.numel() else torch.zeros((), device=self.device)
        self.track_loss(loss, int(losses.numel()))
        optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        if self.privacy is not None:
            self.log("privacy/epsilon", self.privacy.epsilon_spent(), prog_bar=True, on_step=False, on_epoch=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        mean = self._loss_sum / max(self._loss_count, 1)
        self.check_finite(mean)
        self.log("train/loss_epoch", mean, prog_bar=True, on_step=False, on_epoch=True)

    def check_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Stop a diverged run with a clear message instead of training on NaN."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower model.optimizer.lr or check the data")
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.privacy is not None:
            optimizer = self.privacy.wrap_optimizer(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "epoch"}}

    # --- evaluation ---------------------------------------------------------------------------
    def _evaluate_rows(self, stage: str, rows: torch.Tensor) -> None:
        queries = self.trainer.datamodule.queries(stage).subset(rows.cpu().numpy())
        popularity = self.trainer.datamodule.item_popularity(stage)
        try:
            result = evaluate_ranking(self.score_queries, queries, self.ks, popularity,
                                      self.trainer.datamodule.data.n_users, self.eval_memory_mb, self.device)
        except ValueError as exc:
            if "NaN" not in str(exc):
                raise
            # the weights diverged between two loss checks: same failure, same message
            raise FloatingPointError(
                f"training loss is not finite: the model scores NaN at epoch {self.current_epoch}, step "
                f"{self.global_step}; lower model.optimizer.lr or check the data") from exc
        self._eval_results.append(result)

    def _finish_evaluation(self, stage: str) -> dict[str, float]:
        results = self._eval_results
        self._eval_results = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Ranking metrics are means over *queries*: gather every rank's per-query values and
            # merge, never average per-rank means (ranks hold different numbers of queries).
            gathered: list[list[RankingResult]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        if not results:
            return {}
        summary = RankingResult.merge(results).summary()
        prefix = STAGE_PREFIX[stage]
        metrics = {f"{prefix}/{k}": float(v) for k, v in summary.items() if not math.isnan(v)}
        datamodule = getattr(self.trainer, "datamodule", None)
        sample = datamodule.evaluation_sample(stage) if hasattr(datamodule, "evaluation_sample") else None
        if sample is not None:  # TensorBoard shows beside the metrics how many users they come from
            metrics[f"{prefix}/sampled_users"] = float(sample["sampled_users"])
        # every rank holds the same merged values, so no sync (and no averaging) is needed
        self.log_dict(metrics, prog_bar=False, sync_dist=False, rank_zero_only=False)
        self.final_metrics[stage] = metrics
        return metrics

    def validation_step(self, rows: torch.Tensor, batch_idx: int) -> None:
        self._evaluate_rows("valid", rows)

    def on_validation_epoch_end(self) -> None:
        metrics = self._finish_evaluation("valid")
        key = f"val/ndcg@{self.ks[0]}"
        if key in metrics:
            self.log("val_ndcg", metrics[key], prog_bar=True, sync_dist=False)

    def test_step(self, rows: torch.Tensor, batch_idx: int) -> None:
        self._evaluate_rows("test", rows)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # --- checkpoint ---------------------------------------------------------------------------
    def model_facts(self) -> dict[str, Any]:
        """What export needs to rebuild the model without the training config."""
        return {"model_class": class_path(self.net), "model_config": dict(getattr(self.net, "config", {})),
                "task_class": class_path(self), "rectrain_version": rectrain.__version__}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        facts = self.model_facts()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.data is not None:
            facts.update(data_facts(datamodule))
        run_config = getattr(self, "run_config", None)
        if run_config is not None:
            facts["config"] = run_config
        if self.privacy is not None:
            from rectrain.privacy import dp_layer_aliases

            facts["privacy"] = self.privacy.report()
            facts["privacy_state"] = self.privacy.state()
            for cell_key, _ in dp_layer_aliases(self.net):  # the plain GRU/LSTM names stay
                checkpoint.get("state_dict", {}).pop(cell_key, None)
        checkpoint["rectrain"] = facts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resuming a DP run: the accountant continues from the steps already spent
        state = (checkpoint.get("rectrain") or {}).get("privacy_state")
        if self.privacy is not None and state is not None:
            from rectrain.privacy import dp_layer_aliases

            self.privacy.load_state(state)
            weights = checkpoint.get("state_dict", {})
            for cell_key, rnn_key in dp_layer_aliases(self.net):
                if rnn_key in weights:
                    weights.setdefault(cell_key, weights[rnn_key])


def data_facts(datamodule: Any) -> dict[str, Any]:
    """Vocabularies and item side information, as plain lists (loadable with ``weights_only=True``).

    The user vocabulary is *not* here: raw user ids are personal data. It is written as a sidecar
    file next to the checkpoints (see ``rectrain.training``) and referenced by its sha256.
    """
    data = datamodule.data
    return {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "item_vocab": data.item_vocab.tolist(),
        "item_titles": data.item_titles.tolist(),
        "category_vocab": data.category_vocab.tolist(),
        "item_category_indptr": data.item_category_indptr.tolist(),
        "item_category_index": data.item_category_index.tolist(),
        "item_popularity": data.item_popularity("test").tolist(),
        "split": data.split,
        "mask_seen": data.mask_seen,
        "data_fingerprint": data.fingerprint,
        "user_vocab_sha256": getattr(datamodule, "user_vocab_sha256", None),
        # how raw user attributes become the query tower's features (the encoding, not any user's values)
        "user_features": datamodule.user_encoder.to_dict() if getattr(datamodule, "user_features", None) else None,
    }
