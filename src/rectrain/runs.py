"""A trained run, opened one way: :func:`open_run` (checkpoint -> net, facts, kind, sha256, data).

Everything that reads a finished run (export and its int8 quality check, segmenting, calibration,
the offline A/B replay, the benches) opens it here, so there is one rule for each question:

* **loading**: ``torch.load(..., weights_only=True)`` (:func:`load_checkpoint`): rectrain checkpoints
  hold only tensors and plain values (the model's constructor arguments, item vocabulary and
  resolved config under the ``"rectrain"`` key), so no arbitrary pickle is ever executed. Lightning's
  own loads go through :class:`rectrain.tasks.callbacks.SafeCheckpointIO`, which pins this loader.
* **the net**: rebuilt from the recorded class and constructor arguments (:func:`rebuild_model`),
  without the training config or data;
* **the model kind**: ``two_tower`` or ``ncf``, decided by :func:`model_kind` only;
* **the data**: :meth:`Run.data` rebuilds it from the checkpoint's resolved config (optionally with
  ``data.*`` overrides) and accepts it only under one fingerprint policy (:func:`check_same_data`):
  the recorded fingerprint, or, when the files moved, the same item vocabulary and user vocabulary;
* **the user vocabulary** (raw ids: personal data, in ``user_vocab.json`` beside the checkpoints,
  never inside them): read only with its sha256 checked against the checkpoint's record
  (:func:`read_user_vocab`).

No Lightning here: its import costs export and analytics seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from rectrain.errors import RectrainError

#: the user vocabulary sidecar's name, beside the checkpoints
USER_VOCAB_FILE = "user_vocab.json"
TWO_TOWER, NCF = "two_tower", "ncf"
#: rectrain's own data module: its data is rebuilt without importing Lightning
DATAMODULE = "rectrain.tasks.datamodule.RecDataModule"


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check it is a rectrain one.

    ``weights_only=True`` is passed explicitly, so not even ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    (torch's switch back to the pre-2.6 unsafe default) makes it unpickle arbitrary objects.
    """
    p = Path(path)
    if not p.is_file():
        raise RectrainError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message suggests weights_only=False: not for us
        raise RectrainError(f"{p}: refused: it holds pickled objects other than tensors and plain values, which "
                            "could run code (checkpoints load with weights_only=True; rectrain's never need more)"
                            ) from exc
    except Exception as exc:  # truncated or foreign files
        raise RectrainError(f"{p}: not a loadable rectrain checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RectrainError(f"{p}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def rebuild_model(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The trained plain ``nn.Module`` from a checkpoint, without the training config or data."""
    import importlib

    facts = ckpt.get("rectrain")
    if not facts:
        raise RectrainError("checkpoint has no 'rectrain' facts (was it written by rectrain?)")
    module_name, _, class_name = facts["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    net = cls(**facts["model_config"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def model_kind(net: Any) -> str:
    """``two_tower`` for a query-from-history model (``query`` and ``item_vectors``), ``ncf`` for a
    user x item model (``score_all``): the one rule export, analytics and serving metadata follow."""
    if hasattr(net, "query") and hasattr(net, "item_vectors"):
        return TWO_TOWER
    if hasattr(net, "score_all"):
        return NCF
    raise RectrainError(f"{type(net).__name__} is neither a two-tower model (query/item_vectors) nor an NCF-family "
                        "model (score_all)")


def user_vocab_blob(user_vocab: Sequence[Any]) -> bytes:
    """The bytes of a user vocabulary sidecar (what training writes and the checkpoint's sha256 pins)."""
    return json.dumps({"user_vocab": list(user_vocab)}).encode()


@dataclass(frozen=True)
class UserVocab:
    """A user vocabulary sidecar checked against its checkpoint: ``ids[u]`` is the raw id of user index u."""

    path: Path
    blob: bytes
    sha256: str
    ids: list[str]


def read_user_vocab(facts: dict[str, Any], path: str | os.PathLike[str] | None) -> UserVocab:
    """Read a user vocabulary sidecar and check it belongs to the checkpoint ``facts`` describe.

    Raises:
        RectrainError: missing file, sha256 other than the checkpoint's ``user_vocab_sha256``, not a
            vocabulary, or a user count other than the model's.
    """
    p = Path(path) if path else None
    if p is None or not p.is_file():
        raise RectrainError(f"user vocabulary sidecar not found at {p}: an NCF model cannot map raw user ids "
                            f"without it. Pass user_vocab=<path to the run's checkpoints/{USER_VOCAB_FILE}>")
    blob = p.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    expected = facts.get("user_vocab_sha256")
    if expected and digest != expected:
        raise RectrainError(f"{p}: sha256 {digest[:12]} does not match the checkpoint's user_vocab_sha256 "
                            f"{expected[:12]}: this vocabulary belongs to another run")
    try:
        ids = json.loads(blob)["user_vocab"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RectrainError(f"{p}: not a rectrain user vocabulary ({exc})") from exc
    n_users = int(facts.get("n_users") or 0)
    if n_users and len(ids) != n_users:
        raise RectrainError(f"{p}: {len(ids)} users, but the model was trained on {n_users}")
    return UserVocab(p, blob, digest, [str(i) for i in ids])


def check_same_data(path: Path, facts: dict[str, Any], data: Any) -> None:
    """The rebuilt data must be the training data: same fingerprint, or (files moved, so the
    path-based fingerprint differs) the same item vocabulary and the same user vocabulary sha256."""
    if facts.get("data_fingerprint") and data.fingerprint == facts["data_fingerprint"]:
        return
    same_items = list(facts.get("item_vocab", [])) == [str(i) for i in data.item_vocab.tolist()]
    recorded_users = facts.get("user_vocab_sha256")
    users_blob = user_vocab_blob(data.user_vocab.tolist())
    same_users = recorded_users is None or hashlib.sha256(users_blob).hexdigest() == recorded_users
    if not (same_items and same_users and facts.get("n_users", data.n_users) == data.n_users):
        raise RectrainError(f"{path}: the data rebuilt from the checkpoint's config is not the data it was trained "
                            f"on (different {'items' if not same_items else 'users'}); point data.source.* at the "
                            "same files")


def prepared_data(data_cfg: Any) -> Any:
    """The PreparedData of a ``data`` config section, as ``RecDataModule.setup`` builds it.

    For rectrain's own data module this calls the same ``load_or_prepare`` directly (same cache),
    without importing Lightning (which alone costs seconds); any other target is instantiated and set up.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from rectrain.config_checks import build

    values = OmegaConf.to_container(data_cfg, resolve=True)
    if values.get("_target_") != DATAMODULE:
        datamodule = build(data_cfg)
        datamodule.setup()
        return datamodule.data
    from rectrain.data.dataset import DataSettings

    source = instantiate(data_cfg.source)
    try:  # older runs have no engine block: the default engine (it gives the same arrays)
        settings = DataSettings.from_config(values.get("preprocess"), values.get("split"), values.get("engine"))
    except RectrainError as exc:
        raise RectrainError(f"the checkpoint's data config does not fit this rectrain version: {exc}") from None
    return settings.load(source, values.get("cache_dir"))


@dataclass
class Run:
    """A trained run, opened from its checkpoint (see the module docstring; build with :func:`open_run`).

    Attributes:
        path: the checkpoint file.
        ckpt: the loaded checkpoint dict.
        facts: ``ckpt["rectrain"]``: model class and arguments, vocabularies, fingerprint, config.
        net: the plain ``nn.Module``, in eval mode.
        data_overrides: ``data.<key>=<value>`` applied to the checkpoint's data config by :meth:`data`.
    """

    path: Path
    ckpt: dict[str, Any]
    facts: dict[str, Any]
    net: torch.nn.Module
    data_overrides: tuple[str, ...] = ()
    _sha256: str | None = field(default=None, repr=False)
    _data: Any = field(default=None, repr=False)
    _config: Any = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``two_tower`` or ``ncf`` (:func:`model_kind`)."""
        return model_kind(self.net)

    @property
    def sha256(self) -> str:
        """sha256 of the checkpoint file: the key analytics files (segments, calibration) are stored under."""
        if self._sha256 is None:
            from rectrain.utils.io import file_sha256

            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def config(self) -> Any:
        """The resolved run config (DictConfig) with the data overrides applied."""
        if self._config is None:
            from omegaconf import OmegaConf
            from omegaconf.errors import OmegaConfBaseException

            if not self.facts.get("config"):
                raise RectrainError(f"{self.path}: the checkpoint carries no resolved run config (written by an old "
                                    "rectrain?)")
            cfg = OmegaConf.create(self.facts["config"])
            if self.data_overrides:
                try:
                    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(self.data_overrides)))
                except OmegaConfBaseException as exc:
                    raise RectrainError(f"bad data override: {exc}") from None
            self._config = cfg
        return self._config

    def data(self) -> Any:
        """The PreparedData the run was trained on (built once, from the cache when present), checked
        with :func:`check_same_data`.

        Raises:
            RectrainError: no data config, the data cannot be rebuilt, or it is not the training data.
        """
        if self._data is None:
            cfg = self.config
            if "data" not in cfg or "source" not in cfg.data:
                raise RectrainError(f"{self.path}: the checkpoint carries no data config")
            try:
                data = prepared_data(cfg.data)
            except RectrainError:
                raise
            except Exception as exc:  # a moved file, a missing source class
                raise RectrainError(f"{self.path}: cannot rebuild the training data from the checkpoint's config: "
                                    f"{type(exc).__name__}: {exc}") from exc
            check_same_data(self.path, self.facts, data)
            self._data = data
        return self._data

    @property
    def user_features(self) -> Any:
        """(n_users, F) encoded user features for a two-tower model trained on them, else None."""
        from rectrain.features import user_feature_matrix

        if not self.facts.get("user_features"):
            return None
        data = self.data()
        return user_feature_matrix(self.facts.get("user_features"), data.user_attributes, data.n_users)

    def user_vocab_path(self, path: str | os.PathLike[str] | None = None) -> Path:
        """The sidecar to read: ``path`` when given, else ``user_vocab.json`` beside the checkpoint."""
        return Path(path) if path else self.path.parent / USER_VOCAB_FILE

    def user_vocab(self, path: str | os.PathLike[str] | None = None) -> UserVocab:
        """The run's user vocabulary, its sha256 checked (:func:`read_user_vocab`)."""
        return read_user_vocab(self.facts, self.user_vocab_path(path))


def open_run(ckpt_path: str | os.PathLike[str], data_overrides: Sequence[str] = ()) -> Run:
    """Open a checkpoint written by ``train.py``: load it safely and rebuild its net.

    Args:
        ckpt_path: the checkpoint file.
        data_overrides: ``data.<key>=<value>`` strings merged into the checkpoint's data config when
            :meth:`Run.data` rebuilds the data (a dataset moved to another folder).
    """
    bad = [o for o in data_overrides if not o.startswith("data.") or "=" not in o]
    if bad:
        raise RectrainError(f"only data.<key>=<value> overrides are accepted, got {bad[0]!r}")
    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    net = rebuild_model(ckpt)
    return Run(path=path, ckpt=ckpt, facts=dict(ckpt.get("rectrain") or {}), net=net,
               data_overrides=tuple(data_overrides))
