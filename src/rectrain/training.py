"""One training run, from a composed config to a results file: what ``train.py`` calls.

``train(cfg)`` builds everything with ``hydra.utils.instantiate`` (data module, net, task,
callbacks, loggers, trainer), fits, evaluates the best checkpoint on the test split, writes
``results.json`` in the run directory, fills TensorBoard's hparams tab and returns the metrics
(the value a sweeper optimises is ``results["valid"][cfg.optimized_metric]``).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from rectrain.config_checks import build, check_constructor_args, resolve_target
from rectrain.errors import ConfigError
from rectrain.evaluation.ranking import format_table
from rectrain.models.optim import needs_sparse_support
from rectrain.privacy import NO_PRIVACY
from rectrain.runs import USER_VOCAB_FILE, user_vocab_blob
from rectrain.tasks.callbacks import RandomStateCheckpoint, SafeCheckpointIO
from rectrain.utils.io import remove_stale_temporaries, stable_hash, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# The user-vocabulary sidecar is written into the checkpoint directory before fit() (so even a
# crashed run's checkpoints can be exported); Lightning's "directory not empty" warning is expected.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

#: top-level model keys that are shorthands interpolated into ``model.net`` (so ``model.dim=64`` sets
#: every embedding width of a model); they are not arguments of the task.
MODEL_SHORTHANDS = ("dim",)


#: the sizes a net learns from the data (passed by build_net_and_task, never set in the config)
DATA_SIZES = ("n_users", "n_items", "n_categories", "n_user_features")


#: optimizers that apply sparse embedding gradients (model.net.sparse=true)
SPARSE_OPTIMIZERS = ("rectrain.models.optim.LazyAdam", "torch.optim.SparseAdam", "torch.optim.SGD",
                     "torch.optim.Adagrad")


def check_config(cfg: DictConfig) -> None:
    """Check every rectrain setting against its constructor's type hints (``Literal`` choices included)
    *before* any data is read, so a bad value costs one line and exit 2, not a data load first.

    Raises:
        ConfigError: naming the first bad key (``model.net.cell``, ``model.loss``, ``privacy.accountant``...).
    """
    def block(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True)

    data = block(cfg.data)
    check_constructor_args(data["_target_"], data, "data")
    model = block(cfg.model)
    net = model.pop("net")
    check_constructor_args(net["_target_"], net, "model.net", supplied=DATA_SIZES)
    for key in MODEL_SHORTHANDS:
        model.pop(key, None)
    check_constructor_args(model["_target_"], model, "model", supplied=("net",))
    privacy = cfg.get("privacy")
    if privacy and privacy.get("_target_"):
        values = block(privacy)
        check_constructor_args(values["_target_"], values, "privacy")


def build_net_and_task(cfg: DictConfig, datamodule: Any) -> pl.LightningModule:
    """Instantiate ``cfg.model.net`` with sizes learned from the data, then the task around it."""
    data = datamodule.data
    net_values = OmegaConf.to_container(cfg.model.net, resolve=True)
    # sizes learned from the data, passed to the nets that declare them (the two-tower model has no
    # n_users: its query is the item history, so it never sees a user id)
    accepted = inspect.signature(resolve_target(net_values["_target_"])).parameters
    sizes = {"n_users": data.n_users, "n_items": data.n_items, "n_categories": data.n_categories,
             "n_user_features": datamodule.user_encoder.width if hasattr(datamodule, "user_encoder") else 0}
    if sizes["n_user_features"] and "n_user_features" not in accepted:
        raise ConfigError("data.user_features", f"{net_values['_target_'].rsplit('.', 1)[-1]} does not read user "
                          "features (it learns a vector per user id); only the two-tower query tower does")
    sized = {k: v for k, v in sizes.items() if k in accepted and (v or k != "n_user_features")}
    check_constructor_args(net_values["_target_"], net_values, "model.net", supplied=tuple(sized))
    net = build(cfg.model.net, **sized)
    if hasattr(net, "set_item_features"):
        net.set_item_features(data.item_category_matrix())
    optimizer = str(OmegaConf.select(cfg, "model.optimizer._target_", default=""))
    if needs_sparse_support(net) and optimizer not in SPARSE_OPTIMIZERS:
        raise ConfigError("model.net.sparse", f"true gives sparse embedding gradients, which "
                          f"{optimizer or 'this optimizer'} cannot apply: set model.optimizer._target_="
                          f"{SPARSE_OPTIMIZERS[0]} (Adam, lazy on the embeddings) or one of "
                          f"{', '.join(SPARSE_OPTIMIZERS[1:])}")
    task_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    for key in (*MODEL_SHORTHANDS, "net"):
        task_cfg.pop(key, None)
    check_constructor_args(task_cfg["_target_"], task_cfg, "model", supplied=("net",))
    return build(task_cfg, net=net)


def enable_privacy(cfg: DictConfig, datamodule: Any, task: pl.LightningModule) -> Any:
    """``privacy=dp``: check that the run can be made user-level DP and attach the privacy state.

    Returns the :class:`rectrain.privacy.UserLevelDP` now on ``task.privacy`` (None for ``privacy=none``).

    Raises:
        ConfigError: DDP, settings that read other users' data in a user's record, a layer Opacus
            cannot train, or an epsilon that cannot be reached in ``trainer.max_epochs``.
    """
    block = cfg.get("privacy")
    if not block or not block.get("_target_"):
        return None
    strategy, devices = str(cfg.trainer.get("strategy", "auto")), cfg.trainer.get("devices", 1)
    if "ddp" in strategy or (isinstance(devices, int) and devices > 1) or str(devices) == "-1":
        raise ConfigError("trainer.strategy", "privacy=dp trains on one device: Poisson sampling of users, "
                          "per-user clipping and noise are not split across DDP ranks here; use trainer=cpu or gpu")
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("privacy", 'privacy=dp needs Opacus: pip install -e ".[privacy]"') from None
    from rectrain.privacy import UserLevelDP, make_dp_compatible

    values = OmegaConf.to_container(block, resolve=True)
    check_constructor_args(values["_target_"], values, "privacy")
    settings = build(block)
    task.check_privacy()
    if needs_sparse_support(task.net):
        raise ConfigError("model.net.sparse", "privacy=dp clips each user's gradient, which needs dense "
                          "gradients: set model.net.sparse=false")
    make_dp_compatible(task.net)
    n_users = len(datamodule.member_users())
    task.privacy = UserLevelDP(settings, n_users, cfg.trainer.get("max_epochs"))
    plan = task.privacy.plan
    log.info("privacy: user-level (%.3g, %.3g)-DP over %d users, noise multiplier %.3f, sampling rate %.4f, "
             "%d steps", settings.epsilon, plan["delta"], n_users, plan["noise_multiplier"], plan["sample_rate"],
             plan["planned_steps"])
    return task.privacy


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Hyperparameters for TensorBoard's hparams tab: the model, data and trainer settings that
    distinguish runs of a sweep, flattened to ``a/b/c`` keys with scalar values."""
    container = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("_target_", "_partial_", "_recursive_"):
                    if k == "_target_":
                        out[f"{prefix}class"] = str(v).rsplit(".", 1)[-1]
                    continue
                walk(f"{prefix}{k}/", v)
        elif isinstance(node, (list, tuple)):
            out[prefix.rstrip("/")] = str(list(node))
        elif isinstance(node, (int, float, str, bool)) or node is None:
            out[prefix.rstrip("/")] = "None" if node is None else node

    for section in ("model", "data", "privacy"):
        walk(f"{section}/", container.get(section, {}))
    for key in ("max_epochs", "precision", "accelerator", "devices", "strategy"):
        if key in container.get("trainer", {}):
            out[f"trainer/{key}"] = str(container["trainer"][key])
    out["seed"] = container.get("seed")
    # the data source block lists paths and generator sizes; the projector does not need those
    return {k: v for k, v in out.items() if not k.startswith("data/source/columns")}


def write_user_vocab_sidecar(datamodule: Any, directory: Path) -> str:
    """Write the user vocabulary (raw ids: personal data) beside the checkpoints, never inside them.

    Returns the sha256 of the file, which the checkpoint records so export can find and verify it.
    """
    blob = user_vocab_blob(datamodule.data.user_vocab.tolist())
    digest = hashlib.sha256(blob).hexdigest()
    path = directory / USER_VOCAB_FILE
    directory.mkdir(parents=True, exist_ok=True)
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        write_text_atomic(path, blob.decode())
    return digest


def record_failure(cfg: DictConfig, exc: BaseException, overrides: list[str] | None = None) -> None:
    """Write a failed run's ``results.json`` (status and reason) so a sweep summary lists it."""
    try:
        output_dir = Path(cfg.paths.output_dir)
    except Exception:  # no run directory resolvable: nothing to record
        return
    write_json_atomic(output_dir / "results.json", {
        "status": "failed", "reason": f"{type(exc).__name__}: {exc}", "overrides": overrides or [],
        "run": str(output_dir), "valid": {}, "test": {},
    })


def train(cfg: DictConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit, test and report one run; returns ``{"valid": {...}, "test": {...}, ...}``.

    ``extra`` is merged into the results (train.py adds the run's command-line overrides).
    """
    started = time.perf_counter()
    pl.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    check_config(cfg)  # before any data is read
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    data = datamodule.data
    log.info("data: %d users, %d items, %d/%d/%d train/valid/test events (%s)", data.n_users, data.n_items,
             len(data.train), len(data.valid), len(data.test), data.protocol_label())

    task = build_net_and_task(cfg, datamodule)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    privacy = enable_privacy(cfg, datamodule, task)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if privacy is not None:
        # the noise is calibrated for every configured epoch, and choosing when to stop on the users'
        # validation events would be a use of their data outside the accounting
        callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # nothing to write learning rates to (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # not configurable on purpose: exact resume and safe, atomic checkpoints are guarantees, not options
    callbacks.append(RandomStateCheckpoint())
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[SafeCheckpointIO()])

    checkpoint_cb = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    sidecar_dir = Path(checkpoint_cb.dirpath) if checkpoint_cb and checkpoint_cb.dirpath else output_dir / "checkpoints"
    remove_stale_temporaries(sidecar_dir)  # checkpoint writes of a killed run (never a trusted .ckpt)
    datamodule.user_vocab_sha256 = write_user_vocab_sidecar(datamodule, sidecar_dir)

    safe = pinned_weights_only(trainer)
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), **safe)
    best_path = checkpoint_cb.best_model_path if checkpoint_cb else ""
    if privacy is not None and checkpoint_cb is not None:
        # DP: the model is the last one (what the accountant's budget covers); a checkpoint chosen on
        # validation events would reveal more about those users than the accounting says
        best_path = checkpoint_cb.last_model_path or best_path
    valid_metrics = dict(task.final_metrics.get("valid", {}))
    if best_path and checkpoint_cb.best_model_score is not None:
        # re-evaluate the best checkpoint on validation so the reported figures are the best model's
        trainer.validate(task, datamodule=datamodule, ckpt_path=best_path, verbose=False, **safe)
        valid_metrics = dict(task.final_metrics.get("valid", {}))
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        trainer.test(task, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, **safe)
        test_metrics = dict(task.final_metrics.get("test", {}))

    results = {
        "status": "completed",
        "run": str(output_dir),
        "model": type(task.net).__name__,
        "protocol": data.protocol_label(),
        "best_checkpoint": best_path,
        "epochs_trained": int(trainer.current_epoch),
        "seconds": round(time.perf_counter() - started, 2),
        "config_hash": stable_hash(OmegaConf.to_container(cfg.model, resolve=True)),
        "data_fingerprint": data.fingerprint,
        "valid": {k.removeprefix("val/"): v for k, v in valid_metrics.items()},
        "test": {k.removeprefix("test/"): v for k, v in test_metrics.items()},
        "privacy": privacy.report() if privacy is not None else dict(NO_PRIVACY),
        # eval.sample_users: which metrics come from a sample of users (never of negatives)
        "evaluation_sample": {stage: sample for stage in ("valid", "test")
                              if (sample := getattr(datamodule, "evaluation_sample", lambda _: None)(stage))},
        **(extra or {}),
    }
    if trainer.global_rank == 0:
        write_json_atomic(output_dir / "results.json", results)
        _log_hparams(loggers, cfg, valid_metrics, test_metrics, results["privacy"])
        print(results_table(results))
    return results


def pinned_weights_only(trainer: pl.Trainer) -> dict[str, bool]:
    """``{"weights_only": True}`` for Lightning versions whose fit/validate/test take it (2.6+), else {}.

    The trainer's :class:`SafeCheckpointIO` pins ``weights_only=True`` on every load regardless; this
    says the same to Lightning, so no code path of its own can ask for an unsafe load.
    """
    return {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}


def _log_hparams(loggers: list[Any], cfg: DictConfig, valid: dict[str, float], test: dict[str, float],
                 privacy: dict[str, Any] | None = None) -> None:
    metrics = {**{f"hparam/{k}": v for k, v in valid.items()}, **{f"hparam/{k}": v for k, v in test.items()}}
    hparams = flat_hparams(cfg)
    if privacy and privacy.get("differential_privacy", True) and "epsilon" in privacy:
        # the guarantee actually reached, beside the settings: spent epsilon, the delta used, the accountant
        metrics["hparam/privacy_epsilon"] = privacy["epsilon"]
        hparams.update({"privacy/delta_used": privacy["delta"], "privacy/accountant": privacy["accountant"],
                        "privacy/noise_multiplier": privacy["noise_multiplier"]})
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics)
            logger.finalize("success")


def results_table(results: dict[str, Any]) -> str:
    """The small console table printed after a run."""
    rows = {}
    for split in ("valid", "test"):
        if results[split]:
            rows[split] = results[split]
    ks = sorted({int(k.split("@")[1]) for split in rows.values() for k in split if "@" in k})
    metrics = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")] + [f"coverage@{ks[0]}"] if ks else []
    return format_table(rows, metrics, f"{results['model']} ({results['protocol']})")
