"""Loading what an analysis needs from a checkpoint: the net, its facts and the data it was trained on.

The data module is rebuilt from the checkpoint's resolved config (``ckpt["rectrain"]["config"]``),
optionally with ``data.*`` overrides (a dataset moved to another folder), and must have the data
fingerprint the checkpoint recorded: user and item indices only mean something on that data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rectrain.errors import RectrainError


@dataclass
class Loaded:
    path: Path
    sha256: str
    ckpt: dict[str, Any]
    facts: dict[str, Any]
    net: Any
    data: Any  # PreparedData
    config: Any  # the resolved run config (DictConfig), with the overrides applied

    @property
    def user_features(self) -> Any:
        """(n_users, F) encoded user features for a two-tower model trained on them, else None."""
        from rectrain.features import user_feature_matrix

        return user_feature_matrix(self.facts.get("user_features"), self.data.user_attributes, self.data.n_users)


def load_model_and_data(ckpt_path: str | Path, data_overrides: Sequence[str] = ()) -> Loaded:
    """Checkpoint -> net (eval mode), facts, and the PreparedData it was trained on.

    Args:
        ckpt_path: a checkpoint written by ``train.py``.
        data_overrides: ``data.<key>=<value>`` strings merged into the checkpoint's data config.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rectrain.checkpoints import load_checkpoint, rebuild_model
    from rectrain.utils.io import file_sha256

    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    facts = ckpt.get("rectrain") or {}
    if not facts.get("config"):
        raise RectrainError(f"{path}: the checkpoint carries no resolved run config (written by an old rectrain?)")
    cfg = OmegaConf.create(facts["config"])
    bad = [o for o in data_overrides if not o.startswith("data.") or "=" not in o]
    if bad:
        raise RectrainError(f"only data.<key>=<value> overrides are accepted, got {bad[0]!r}")
    if data_overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(data_overrides)))
        except OmegaConfBaseException as exc:
            raise RectrainError(f"bad data override: {exc}") from None
    data = prepared_data(cfg.data)
    check_same_data(path, facts, data)
    net = rebuild_model(ckpt)
    return Loaded(path=path, sha256=file_sha256(path), ckpt=ckpt, facts=facts, net=net, data=data, config=cfg)


def check_same_data(path: Path, facts: dict[str, Any], data: Any) -> None:
    """The rebuilt data must be the training data: same fingerprint, or (files moved, so the
    path-based fingerprint differs) the same item vocabulary and the same user vocabulary sha256."""
    import hashlib
    import json

    if facts.get("data_fingerprint") and data.fingerprint == facts["data_fingerprint"]:
        return
    same_items = list(facts.get("item_vocab", [])) == [str(i) for i in data.item_vocab.tolist()]
    recorded_users = facts.get("user_vocab_sha256")
    users_blob = json.dumps({"user_vocab": data.user_vocab.tolist()}).encode()
    same_users = recorded_users is None or hashlib.sha256(users_blob).hexdigest() == recorded_users
    if not (same_items and same_users and facts.get("n_users", data.n_users) == data.n_users):
        raise RectrainError(f"{path}: the data rebuilt from the checkpoint's config is not the data it was trained "
                            f"on (different {'items' if not same_items else 'users'}); point data.source.* at the "
                            "same files")


DATAMODULE = "rectrain.tasks.datamodule.RecDataModule"


def prepared_data(data_cfg: Any) -> Any:
    """The PreparedData of a ``data`` config section, as ``RecDataModule.setup`` builds it.

    For rectrain's own data module this calls the same ``load_or_prepare`` directly (same cache),
    without importing Lightning (which alone costs seconds); any other target is instantiated.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(data_cfg, resolve=True)
    if values.get("_target_") != DATAMODULE:
        from rectrain.training import build

        datamodule = build(data_cfg)
        datamodule.setup()
        return datamodule.data
    from hydra.utils import instantiate

    from rectrain.data.dataset import PreprocessConfig, SplitConfig, load_or_prepare

    source = instantiate(data_cfg.source)
    try:
        pre = PreprocessConfig(**(values.get("preprocess") or {}))
        split = SplitConfig(**(values.get("split") or {}))
    except TypeError as exc:
        raise RectrainError(f"the checkpoint's data config does not fit this rectrain version: {exc}") from None
    return load_or_prepare(source, pre, split, values.get("cache_dir"))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (reports are drawn on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, title: str = "") -> None:
    """Title, tight layout and an atomic PNG write (no half-written picture), then free the figure."""
    from rectrain.utils.io import atomic_path

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
