"""Lightning callbacks and the checkpoint I/O plugin rectrain adds to the stock ones: the embedding
projector, and what makes a resumed run repeat an uninterrupted one and checkpoints safe to trust
(random states, last/best checkpoints, atomic writes and ``weights_only`` loads)."""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from rectrain.runs import load_checkpoint
from rectrain.errors import RectrainError
from rectrain.utils.io import atomic_path


class ItemEmbeddingProjector(pl.Callback):
    """Writes the trained item embeddings to TensorBoard's projector, labelled with titles and categories.

    Only the ``max_items`` most popular items are written: the projector gets slow beyond ~10k
    points, and popular items are the ones a person can judge.
    """

    def __init__(self, max_items: int = 5000) -> None:
        self.max_items = max_items

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        net = getattr(pl_module, "net", None)
        if logger is None or net is None or not hasattr(net, "item_embeddings") or trainer.global_rank != 0:
            return
        data = trainer.datamodule.data
        with torch.no_grad():
            emb = net.item_embeddings().detach().float().cpu()
        popularity = torch.as_tensor(data.item_popularity("valid"))
        keep = torch.argsort(popularity, descending=True, stable=True)[: self.max_items]
        titles = data.item_titles if data.item_titles.size else data.item_vocab
        cats = data.item_category_indptr
        labels = []
        for i in keep.tolist():
            names = data.category_vocab[data.item_category_index[cats[i]:cats[i + 1]]] if data.n_categories else []
            # tabs and newlines would break the projector's TSV metadata
            title = str(titles[i]).replace("\t", " ").replace("\n", " ") or str(data.item_vocab[i])
            labels.append([title, "|".join(names), str(int(popularity[i]))])
        logger.experiment.add_embedding(emb[keep], metadata=labels, metadata_header=["title", "categories", "popularity"],
                                        tag="item_embeddings", global_step=trainer.global_step)


def _is_local(path: str | os.PathLike[str]) -> bool:
    scheme = str(path).split("://", 1)[0] if "://" in str(path) else "file"
    return scheme == "file"


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with rectrain's guarantees: safe loads, atomic local writes.

    * every load is :func:`load_checkpoint` (``weights_only=True`` whatever the caller or the
      environment asks; a bad file is a :class:`RectrainError`, one line, not a traceback or code
      run from a pickle), so ``trainer.fit/validate/test(ckpt_path=...)`` are as safe as export;
    * a local checkpoint is written to a temporary beside it and renamed (``atomic_path``): a run
      killed while writing leaves the previous ``last.ckpt`` intact, never a truncated file, and its
      temporary is removed by the next run (``remove_stale_temporaries``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(str(path).removeprefix("file://")) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path: Any, map_location: Callable[..., Any] | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path):
            return load_checkpoint(str(path).removeprefix("file://"), map_location=map_location or "cpu")
        try:  # a remote file (fsspec): the same pinned safe loader, through Lightning's fetch
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as exc:
            raise RectrainError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc


# --- exact resume ----------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng_state() -> dict[str, Any]:
    """This process's global random states (torch, the current CUDA device, numpy, ``random``).

    Only tensors and plain Python values, so a checkpoint holding them still loads with
    ``torch.load(weights_only=True)``: numpy's key array becomes an int64 tensor.
    """
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda_ready else None,
        "numpy": {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["algorithm"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RandomStateCheckpoint(pl.Callback):
    """Saves every rank's global random states in each checkpoint and restores them on resume.

    rectrain's own randomness does not need it (batches and negatives come from generators seeded
    by (seed, epoch, rank), dropout from the per-epoch ``torch.manual_seed`` of the task), but a
    user's task, net or callback drawing from the global torch/numpy/``random`` generators outside
    that seeded window would otherwise restart from the run's initial seed. Under DDP the states
    are gathered to every rank (a list indexed by rank, written by rank 0): each rank continues its
    own stream. Resuming with another number of processes cannot continue them; that is said once
    and the streams start from the seed.
    """

    @property
    def state_key(self) -> str:
        return "RandomStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        own = capture_rng_state()
        rank, world = _rank_world()
        if world == 1:
            return {"ranks": [own]}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, own)  # every rank dumps the checkpoint; rank 0 writes it
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        rank, world = _rank_world()
        if len(ranks) != world:
            rank_zero_warn(f"the checkpoint holds random states of {len(ranks)} process(es), this run has {world}: "
                           "global random streams restart from the seed, so the run will not repeat exactly")
            return
        restore_rng_state(ranks[rank])


def _same_dir(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest epoch and whose best survives a resume.

    * ``last.ckpt`` is written at the end of every epoch (Lightning 2.6 writes it only when a top-k
      checkpoint was written in the same step, so after a plateau it stayed at the best epoch and a
      resume repeated epochs);
    * a superseded best checkpoint is deleted only after ``last.ckpt`` is written: a run killed
      between the two writes leaves a ``last.ckpt`` whose recorded best still exists;
    * resuming from a checkpoint of another run directory (``python train.py ckpt_path=...`` makes
      a new one) keeps the best score and top-k of the interrupted run: those checkpoints are copied
      into this run's directory, so ``best_checkpoint`` is the best over all epochs and the new run
      directory is complete on its own; the old directory is never modified.

    Files are written by the trainer's checkpoint I/O (rectrain's is atomic, see
    :class:`SafeCheckpointIO`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None
        self._superseded: list[str] = []
        self._carried: dict[str, str] = {}  # path here -> path in the resumed run's directory

    @property
    def state_key(self) -> str:
        # the stock class's key: checkpoints written by a plain ModelCheckpoint resume into this one
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    # --- last.ckpt every epoch, deletions after it ----------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._finish_save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._finish_save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._remove_superseded(trainer)

    def _finish_save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` if this step's save did not, then delete what it superseded."""
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if self.save_last and self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._remove_superseded(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # deferred: until last.ckpt is rewritten it may still name this file as the best
        self._superseded.append(filepath)

    def _remove_superseded(self, trainer: pl.Trainer) -> None:
        pending, self._superseded = self._superseded, []
        for path in pending:
            super()._remove_checkpoint(trainer, path)

    # --- the best of a run resumed into another directory ---------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir is None or self.dirpath is None or _same_dir(old_dir, self.dirpath):
            super().load_state_dict({**state_dict, "dirpath": self.dirpath})
            return
        here = {old: os.path.join(self.dirpath, os.path.basename(old)) for old in state_dict.get("best_k_models", {})}
        self._carried = {new: old for old, new in here.items()}
        super().load_state_dict({
            **state_dict,
            "dirpath": self.dirpath,
            "best_k_models": {here[old]: score for old, score in state_dict.get("best_k_models", {}).items()},
            "best_model_path": here.get(state_dict.get("best_model_path", ""), ""),
            "kth_best_model_path": here.get(state_dict.get("kth_best_model_path", ""), ""),
            "last_model_path": "",  # this run writes its own last.ckpt
        })

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._carried:
            self._copy_carried(trainer)

    def _copy_carried(self, trainer: pl.Trainer) -> None:
        """Copy the resumed run's top-k checkpoints here (rank 0); forget those that are gone."""
        missing: list[str] = []
        if trainer.is_global_zero:
            for new, old in self._carried.items():
                if not os.path.isfile(old):
                    missing.append(new)
                    continue
                with atomic_path(new) as tmp:
                    shutil.copyfile(old, tmp)
        missing = trainer.strategy.broadcast(missing)
        if missing:
            rank_zero_warn(f"best checkpoint(s) of the resumed run are gone ({', '.join(self._carried[m] for m in missing)}): "
                           "the best is chosen among the checkpoints still there and the epochs from here on")
            self._forget(missing)
        self._carried = {}
        trainer.strategy.barrier("ResumableCheckpoint.copy")

    def _forget(self, paths: list[str]) -> None:
        """Drop top-k entries whose file no longer exists and recompute the best and k-th."""
        for path in paths:
            self.best_k_models.pop(path, None)
        if not self.best_k_models:
            self.best_model_path, self.best_model_score = "", None
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            return
        better, worse = (min, max) if self.mode == "min" else (max, min)
        self.best_model_path = better(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        self.kth_best_model_path = worse(self.best_k_models, key=self.best_k_models.get)
        self.kth_value = self.best_k_models[self.kth_best_model_path]
