"""The LightningDataModule: prepared data in, tensor batches and evaluation queries out.

The heavy lifting lives in ``rectrain.data`` (plain Python, no Lightning): this module only decides
which batch builder a task asks for, shards work across DDP ranks and caches what does not change
between epochs (queries, membership tables, the epoch-independent sampler).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from rectrain.data.batching import (
    NegativeSampler,
    PointwiseBatches,
    PointwiseSpec,
    Prefetcher,
    SequenceBatches,
    SequenceSpec,
    ShardedBatches,
    count_windows,
    positive_keys,
    sequence_windows,
    user_shards,
)
from rectrain.data.records import PointwiseUserRecords, SequenceUserRecords, UserRecordSpec
from rectrain.data.dataset import DataSettings, PreparedData
from rectrain.errors import ConfigError
from rectrain.data.queries import LazyQueries
from rectrain.features import UserFeatureEncoder
from rectrain.utils.arrays import unique_ints


def _as_is(batch: Any) -> Any:
    """Batches are built whole by the batch builders: nothing to collate or convert."""
    return batch


class _Batches(IterableDataset):
    """Hands a batch builder to a DataLoader (``batch_size=None``: batches are already whole)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _RowChunks:
    """This rank's evaluation query rows, in chunks (contiguous shards: gathered results stay in order)."""

    def __init__(self, n_rows: int, chunk: int, rank: int, world_size: int) -> None:
        per_rank = math.ceil(n_rows / world_size)
        self.rows = torch.arange(rank * per_rank, min(n_rows, (rank + 1) * per_rank))
        self.chunk = chunk

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.rows.split(self.chunk))

    def __len__(self) -> int:
        return math.ceil(self.rows.numel() / self.chunk)


class RecDataModule(pl.LightningDataModule):
    """Interaction data for any rectrain task.

    Args:
        source: an object with ``load()`` and ``fingerprint()`` (see ``rectrain.data.sources``).
        preprocess: fields of :class:`rectrain.data.preprocess.PreprocessConfig`.
        split: fields of :class:`rectrain.data.dataset.SplitConfig`.
        cache_dir: where prepared datasets are cached (None: no cache).
        verify_cache: checksum every file of the cached dataset on this datamodule's first load,
            not only on the first load of a new cache (sizes and array headers are checked on every
            load regardless). A cache that fails is rebuilt with one warning.
        batch_size: positives (pointwise) or sequences (sequence tasks) per training step.
        eval_batch_size: evaluation queries per step.
        seed: the base of every epoch's sampling seed.
        prefetch: training batches built ahead in a background thread (0: built inline, between
            steps). The batches are the same either way; only the overlap changes.
        user_features: user attributes (columns of the log's user table, e.g. ``[age, gender,
            occupation]`` for MovieLens, ``[age, region]`` for the synthetic data) fed to models
            that read user-side features (the two-tower query tower). None: none.
        train_user_fraction: train on the events of a seeded random share of the users only; the
            others stay in the vocabulary and evaluation but are never trained on (held-out users,
            what a membership-inference audit compares against: bench/privacy.py). 1: everyone.
        engine: fields of :class:`rectrain.data.engine.EngineConfig`: which engine preprocesses
            the log (``duckdb`` by default, ``spark`` for a cluster) and its memory cap.
        valid_sample_users / test_sample_users: evaluate on a seeded random sample of this many
            users (queries, for sessions) instead of all of them (``eval.sample_users``: validation
            during a long training; the test stays complete unless ``eval.test_sample_users`` says
            otherwise). Every item is still ranked: users are sampled, never negatives; the
            protocol label and results.json say so.
    """

    def __init__(self, source: Any, preprocess: Mapping[str, Any] | None = None,
                 split: Mapping[str, Any] | None = None, cache_dir: str | None = None, batch_size: int = 1024,
                 eval_batch_size: int = 256, seed: int = 0, prefetch: int = 0,
                 user_features: list[str] | tuple[str, ...] | None = None, verify_cache: bool = False,
                 train_user_fraction: float = 1.0, engine: Mapping[str, Any] | None = None,
                 valid_sample_users: int | None = None, test_sample_users: int | None = None) -> None:
        super().__init__()
        self.source = source
        for key, value in (("valid_sample_users", valid_sample_users), ("test_sample_users", test_sample_users)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"eval.{'sample_users' if key.startswith('valid') else key}",
                                  f"must be a positive integer or null, got {value!r}")
        self.sample_users = {"valid": valid_sample_users, "test": test_sample_users}
        self.settings = DataSettings.from_config(preprocess, split, engine)
        self.engine, self.preprocess, self.split = self.settings.engine, self.settings.preprocess, self.settings.split
        self.cache_dir = cache_dir
        self.verify_cache = bool(verify_cache)
        self._cache_checked = False  # verify_cache: checksum once per datamodule, not in prepare_data and setup
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ConfigError("data.prefetch", f"must be >= 0, got {prefetch}")
        self.batch_size, self.eval_batch_size, self.seed, self.prefetch = batch_size, eval_batch_size, seed, prefetch
        if not 0.0 < train_user_fraction <= 1.0:
            raise ConfigError("data.train_user_fraction", f"must be in (0, 1], got {train_user_fraction}")
        self.train_user_fraction = float(train_user_fraction)
        self.user_features = [str(f) for f in user_features] if user_features else []
        self._user_encoder: UserFeatureEncoder | None = None
        self.data: PreparedData | None = None
        self.train_spec: PointwiseSpec | SequenceSpec = PointwiseSpec()
        self._queries: dict[str, LazyQueries] = {}
        self._query_totals: dict[str, int] = {}
        self._train_batches: Any = None

    # --- data ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Runs on one process per node: builds (and caches) the dataset once.
        self._load_or_prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self._load_or_prepare()

    def _load_or_prepare(self) -> PreparedData:
        """The prepared data; checksummed (``verify_cache``) on this datamodule's first load only."""
        verify = self.verify_cache and not self._cache_checked
        data = self.settings.load(self.source, self.cache_dir, verify=verify)
        self._cache_checked = True
        return data

    @property
    def user_encoder(self) -> UserFeatureEncoder:
        """The encoding of ``user_features`` (empty when none are configured), fitted on the user table."""
        if self._user_encoder is None:
            self.setup()
            if not self.user_features:
                self._user_encoder = UserFeatureEncoder()
            else:
                table = self.data.user_attributes
                if not table:
                    raise ConfigError("data.user_features", "this log has no user table (session logs never do; "
                                      "MovieLens and the synthetic data do)")
                try:
                    self._user_encoder = UserFeatureEncoder.fit(table, self.user_features)
                except KeyError as exc:
                    raise ConfigError("data.user_features", f"unknown user attribute {exc.args[0]!r}; the user "
                                      f"table has: {', '.join(sorted(table))}") from None
        return self._user_encoder

    def user_feature_matrix(self) -> np.ndarray:
        """(n_users, width) float32 encoded features of every user index; (n_users, 0) when none."""
        self.setup()
        encoder = self.user_encoder
        if not encoder.columns:
            return np.zeros((self.data.n_users, 0), dtype=np.float32)
        return encoder.encode_columns(self.data.user_attributes, self.data.n_users)

    def queries(self, stage: str) -> LazyQueries:
        """Evaluation queries for ``valid``/``test``: each evaluation batch builds its own rows, so a
        large log's histories never exist all at once.

        With ``<stage>_sample_users`` set, a seeded sample of them (the same every epoch and on
        every DDP rank), labelled as such in the protocol.
        """
        if stage not in self._queries:
            self.setup()
            queries = self.data.lazy_queries(stage)
            size, full = self.sample_users.get(stage), len(queries)
            self._query_totals[stage] = full
            if size is not None and size < full:
                rng = np.random.default_rng([int(self.seed), 1 if stage == "valid" else 2])
                queries = queries.select(np.sort(rng.choice(full, size=size, replace=False)))
                unit = "queries" if self.data.split == "session" else "users"
                queries = dataclasses.replace(queries, protocol=(
                    f"{queries.protocol}; {stage} on a seeded sample of {size:,} of {full:,} {unit} "
                    f"(users sampled, not negatives: every item is ranked)"))
            self._queries[stage] = queries
        return self._queries[stage]

    def evaluation_sample(self, stage: str) -> dict[str, Any] | None:
        """How ``stage`` was evaluated when users were sampled (for results.json), else None."""
        size = self.sample_users.get(stage)
        if size is None:
            return None
        queries = self.queries(stage)
        return {"sampled_users": len(queries), "of": self._query_totals[stage], "seed": int(self.seed),
                "protocol": queries.protocol}

    # --- batches ------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def member_users(self) -> np.ndarray:
        """Sorted indices of the users whose training events are trained on (see ``train_user_fraction``)."""
        self.setup()
        users = unique_ints(self.data.train.user)
        if self.train_user_fraction >= 1.0:
            return users
        rng = np.random.default_rng(self.seed + 7_777)
        n = max(1, round(self.train_user_fraction * len(users)))
        return np.sort(rng.choice(users, n, replace=False))

    def training_events(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the training events trained on, in the log's order."""
        self.setup()
        train = self.data.train
        if self.train_user_fraction >= 1.0:
            return train.user, train.item
        keep = np.isin(train.user, self.member_users())
        return train.user[keep], train.item[keep]

    def train_batches(self) -> (PointwiseBatches | SequenceBatches | ShardedBatches | PointwiseUserRecords
                                | SequenceUserRecords):
        """The epoch-aware batch builder for the task's spec (built once; ``set_epoch`` per epoch)."""
        if self._train_batches is None:
            self.setup()
            data, spec = self.data, self.train_spec
            rank, world = self._rank_world()
            records = spec if isinstance(spec, UserRecordSpec) else None
            spec = records.inner if records else spec
            users, items = self.training_events()
            bounds = user_shards(users)
            if records is None and len(bounds) - 1 >= max(2, world):  # a large log: streamed shard by shard
                self._train_batches = self._sharded_batches(spec, users, items, bounds, rank, world)
            elif isinstance(spec, PointwiseSpec):
                keys = positive_keys(users, items, data.n_items) if spec.exclude_positives else None
                sampler = NegativeSampler(data.n_items, self.item_popularity("valid"), spec.alpha, keys)
                if records:
                    self._train_batches = PointwiseUserRecords(users, items, records, sampler, self.seed)
                else:
                    self._train_batches = PointwiseBatches(users, items, data.n_items, spec, self.batch_size,
                                                           sampler, self.seed, rank, world)
            else:
                windows, lengths, first, owner = sequence_windows(users, items, spec.max_length, spec.stride)
                batches = SequenceBatches(windows, lengths, self.batch_size,
                                          self.seed, rank, world, first_target=first,
                                          groups=owner if self.user_features else None)
                if records:  # the same windows and targets, one user per row
                    batches = SequenceUserRecords(batches.inputs, batches.lengths, batches.targets, owner, records,
                                                  self.seed)
                self._train_batches = batches
        return self._train_batches

    def _sharded_batches(self, spec: PointwiseSpec | SequenceSpec, users: np.ndarray, items: np.ndarray,
                         bounds: np.ndarray, rank: int, world: int) -> ShardedBatches:
        """The training split streamed one shard of whole users at a time (disjoint shards per rank):
        positives to reject and sequence windows are a shard's, so memory does not grow with the log."""
        n_items, batch_size = self.data.n_items, self.batch_size
        if isinstance(spec, PointwiseSpec):
            popularity = self.item_popularity("valid")

            def build(lo: int, hi: int, seed: int) -> PointwiseBatches:
                u, i = np.asarray(users[lo:hi], np.int64), np.asarray(items[lo:hi], np.int64)
                keys = positive_keys(u, i, n_items) if spec.exclude_positives else None
                return PointwiseBatches(u, i, n_items, spec, batch_size,
                                        NegativeSampler(n_items, popularity, spec.alpha, keys), seed)

            return ShardedBatches(bounds, lambda lo, hi: math.ceil((hi - lo) / batch_size), build, self.seed,
                                  rank, world)
        with_users = bool(self.user_features)

        def build_sequences(lo: int, hi: int, seed: int) -> SequenceBatches:
            windows, lengths, first, owner = sequence_windows(users[lo:hi], items[lo:hi], spec.max_length,
                                                              spec.stride)
            return SequenceBatches(windows, lengths, batch_size, seed, first_target=first,
                                   groups=owner if with_users else None)

        def steps(lo: int, hi: int) -> int:
            return math.ceil(count_windows(users[lo:hi], spec.max_length, spec.stride) / batch_size)

        return ShardedBatches(bounds, steps, build_sequences, self.seed, rank, world)

    def train_dataloader(self) -> DataLoader:
        # generator: creating the loader's iterator draws a base seed from it; from the global RNG
        # that draw would shift dropout by when Lightning creates the iterator (before the epoch's
        # seed on the first epoch of a run, after it on later ones), so a resumed run would differ
        return DataLoader(_Batches(Prefetcher(self.train_batches(), self.prefetch)), batch_size=None,
                          collate_fn=_as_is, generator=torch.Generator())

    def _eval_loader(self, stage: str) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(_Batches(_RowChunks(len(self.queries(stage)), self.eval_batch_size, rank, world)),
                          batch_size=None, collate_fn=_as_is, generator=torch.Generator())  # see train_dataloader

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def item_popularity(self, stage: str) -> np.ndarray:
        """Distinct users per item in ``stage``'s history (every evaluation batch of every epoch reads
        it): kept by the prepared data, which counted it once (:meth:`PreparedData.item_popularity`)."""
        self.setup()
        return self.data.item_popularity(stage)
