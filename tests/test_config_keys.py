"""Every setting has one home and is never silently ignored.

For every config file of every group (conf/<group>/<option>.yaml, nested groups such as data/engine
included) and every leaf key it sets, the test changes the value, builds the objects that section
configures (data module, net and task, trainer, callbacks, loggers, privacy settings) without
reading any data or training, and asserts that they differ from the objects built from the unchanged
config. A value the constructors reject with a ConfigError naming that key also proves the key is
read. The keys read by code other than a constructor are listed in INFORMATIONAL with the reason.
Experiment, debug and sweep files must only set keys that exist (or that a constructor takes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from rectrain.config_checks import build, check_constructor_args
from rectrain.errors import ConfigError
from rectrain.training import MODEL_SHORTHANDS, build_net_and_task
from tests.conftest import ROOT

CONF = ROOT / "conf"
#: groups whose options are deltas of other groups' keys (checked for known keys, not built)
DELTA_GROUPS = ("experiment", "debug", "hparams_search")

#: keys read by code other than the constructors this test builds, and why
INFORMATIONAL = {
    "seed": "seeds every run (pl.seed_everything in training.train) and is interpolated into data.seed and "
            "model.seed, which this test covers",
    "torch_threads": "torch.set_num_threads in training.train",
    "optimized_metric": "the value train.py returns to a sweeper",
    "ckpt_path": "the checkpoint trainer.fit resumes from (tests/test_resume.py)",
    "test": "whether training.train evaluates on the test split (tests/test_train.py)",
    "paths.data_dir": "where experiment files point data.source.* (conf/experiment/*.yaml)",
    "model.pretrained.gmf": "a GMF checkpoint NeuMF starts from (tests/test_train.py)",
    "model.pretrained.mlp": "an MLP checkpoint NeuMF starts from (tests/test_train.py)",
    "model.pretrained.alpha": "the GMF/MLP mix of the pretrained NeuMF (read only with both checkpoints)",
    "trainer.accelerator": "the device: auto resolves to the one present, so on a CPU-only machine every choice "
                           "builds the same CPU trainer (GPU runs: bench/gpu_smoke.sh)",
    "trainer.strategy": "ddp spawns processes when fit starts: tests/test_ddp.py and tests/test_resume.py train with it",
}
#: engine choice: which engine prepares the data is only visible once data is prepared
ENGINE_REASON = "engine choice: proved by tests/test_engine*.py"

#: values to switch to where "a different value of the same type" is not enough (choices, nulls)
ALTERNATIVES: dict[str, Any] = {
    "data.split.kind": "global_time",
    "data.preprocess.dedup": "last",
    "data.preprocess.min_rating": 3.0,
    "data.user_features": ["age"],
    "data.source.item_features": {"path": "items.csv", "columns": {"item": "item_id"}},
    "model.net.cell": "lstm",
    "model.net.repeat_mode": "mixture",
    "model.loss": {"rectrain.tasks.ncf.NCFTask": "bpr", "rectrain.tasks.two_tower.TwoTowerTask": "sampled"},
    "model.positions": "last",
    "model.stride": 7,
    "model.scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 3},
    "model.tune_repeat_boost": [0.0, 1.0],
    "privacy.accountant": "prv",
    "privacy.delta": 1e-6,
    "trainer.precision": "64-true",
    "logger.tensorboard.version": "v1",
    "callbacks.model_checkpoint.mode": "min",
    "callbacks.early_stopping.mode": "min",
    "callbacks.lr_monitor.logging_interval": "step",
}
#: keys whose change only takes effect together with another one (a repeat bonus needs slots)
COMPANIONS = {"model.tune_repeat_boost": {"model.net.repeat_slots": 2},
              "model.net.repeat_gate": {"model.net.repeat_slots": 2},
              "model.net.repeat_mode": {"model.net.repeat_slots": 2}}

SIZES = types.SimpleNamespace(n_users=30, n_items=40, n_categories=5, user_attributes={})


def _compose(overrides: list[str], tmp: Path) -> DictConfig:
    """The composed config; mandatory values (``???``: a log's path) get a placeholder path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp / 'run'}",
                                                      f"paths.cache_dir={tmp / 'cache'}", *overrides])
    for key in _leaves(cfg, ""):
        parent, _, name = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, name):
            OmegaConf.update(cfg, key, str(tmp / "log.csv"), merge=False)
    return cfg


def _package(path: Path) -> str | None:
    """``None`` for a global package file, else the dotted package (the group's path)."""
    head = path.read_text().splitlines()[:3]
    if any(line.strip() == "# @package _global_" for line in head):
        return None
    return ".".join(path.parent.relative_to(CONF).parts)


def _leaves(node: Any, prefix: str) -> list[str]:
    if isinstance(node, DictConfig):
        if not len(node) and prefix:
            return [prefix]
        out: list[str] = []
        for key in node:
            if key in ("defaults", "hydra") or str(key).startswith("_"):
                continue
            out += _leaves(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix]


def config_files() -> list[tuple[str, Path]]:
    """(group, file) for every option file, nested groups included; ``""`` is conf/train.yaml."""
    files = [("", CONF / "train.yaml")]
    for path in sorted(CONF.rglob("*.yaml")):
        if path.parent != CONF:
            files.append(("/".join(path.parent.relative_to(CONF).parts), path))
    return files


def _defaults() -> dict[str, str]:
    """The options conf/train.yaml (and the default data option, for its nested groups) select."""
    chosen: dict[str, str] = {}
    for entry in OmegaConf.load(CONF / "train.yaml").defaults:
        if isinstance(entry, DictConfig):
            chosen.update({str(k): str(v) for k, v in entry.items()})
    for entry in OmegaConf.load(CONF / "data" / f"{chosen['data']}.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            chosen.update({f"data/{k}": str(v) for k, v in entry.items()})
    return chosen


def _selection(group: str, path: Path) -> list[str]:
    """The overrides that put this option file in the composed config (none for a default option)."""
    if not group or _defaults().get(group) == path.stem:
        return []
    choice = f"{group}={path.stem}"
    if group.startswith("data/"):  # a nested data group: its data option must list it in its defaults
        parent = next(p for p in sorted((CONF / "data").glob("*.yaml"))
                      if f"{group.split('/', 1)[1]}:" in p.read_text())
        return [f"data={parent.stem}", choice]
    if group == "trainer" and path.stem == "gpu":
        return [choice]  # built on this machine with trainer.accelerator=cpu (see _build)
    return [choice]


# --- building without data -----------------------------------------------------------------------
class _FakeDataModule:
    """What build_net_and_task reads from a data module: sizes and the item category matrix."""

    def __init__(self) -> None:
        import numpy as np

        self.data = types.SimpleNamespace(**vars(SIZES), item_category_matrix=lambda: np.eye(40, 5, dtype=np.float32))
        self.user_encoder = types.SimpleNamespace(width=0)


def _build(cfg: DictConfig, section: str) -> dict[str, Any]:
    """The objects ``section`` configures (everything for top-level and paths keys)."""
    out: dict[str, Any] = {}
    everything = section in ("", "paths", "seed", "eval")
    if everything or section == "data":
        out["data"] = build(cfg.data)
    if everything or section == "model":
        torch.manual_seed(0)
        task = build_net_and_task(cfg, _FakeDataModule())
        out["model"] = task
    if everything or section == "callbacks":
        out["callbacks"] = {k: build(c) for k, c in (cfg.get("callbacks") or {}).items() if c is not None}
    if everything or section == "logger":
        out["logger"] = {k: build(c) for k, c in (cfg.get("logger") or {}).items() if c is not None}
    if everything or section == "trainer":
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        if trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
            trainer["accelerator"] = "cpu"  # the gpu option's other keys are still built
        if trainer.get("strategy") == "ddp":
            check_constructor_args(trainer["_target_"], trainer, "trainer")
            trainer["strategy"] = "auto"  # DDP would spawn; its keys are checked by name above
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            out["trainer"] = build(trainer, logger=False, enable_checkpointing=False)
            out["torch_deterministic"] = torch.are_deterministic_algorithms_enabled()  # where Lightning puts it
        finally:  # Trainer(deterministic=True) switches torch globally: leave the process as it was
            torch.use_deterministic_algorithms(deterministic)
    if section == "privacy" and cfg.privacy.get("_target_"):
        out["privacy"] = build(cfg.privacy)
    return out


#: what every nn.Module / LightningModule holds for torch's and Lightning's own bookkeeping
_MODULE_INTERNALS = set(vars(torch.nn.Module())) | {"_trainer", "_fabric", "_device", "_current_fx_name",
                                                     "_param_requires_grad_state", "_metric_attributes",
                                                     "_compiler_ctx", "_jit_is_scripting", "_log_hyperparams"}


def describe(obj: Any, depth: int = 0, seen: set[int] | None = None) -> Any:
    """A comparable picture of an object graph: plain values, tensors by shape and sum, attributes."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), round(float(obj.detach().double().sum()), 6))
    if depth > 6 or id(obj) in seen:
        return type(obj).__name__
    seen = seen | {id(obj)}  # the ancestors only: a shared object is described wherever it is reached
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth + 1, seen) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1, seen) for k, v in obj.items()}
    if isinstance(obj, functools.partial):
        return {"partial": getattr(obj.func, "__name__", str(obj.func)), **describe(obj.keywords, depth + 1, seen)}
    if isinstance(obj, torch.nn.Module):
        attrs = {k: v for k, v in vars(obj).items() if k not in _MODULE_INTERNALS}
        children = {k: describe(v, depth + 1, seen) for k, v in obj._modules.items()}
        tensors = {k: describe(v, depth + 1, seen) for k, v in [*obj._parameters.items(), *obj._buffers.items()]}
        return {"module": type(obj).__name__, "children": children, "tensors": tensors,
                **{k: describe(v, depth + 1, seen) for k, v in attrs.items()
                   if not callable(v) or isinstance(v, functools.partial)}}
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        attrs = vars(obj) if hasattr(obj, "__dict__") else dataclasses.asdict(obj)
        return {"type": type(obj).__name__,
                **{k: describe(v, depth + 1, seen) for k, v in attrs.items() if not callable(v) or k == "optimizer"}}
    return type(obj).__name__


# --- the test --------------------------------------------------------------------------------------
def _candidates(key: str, value: Any, cfg: DictConfig) -> list[Any]:
    """Values to switch ``key`` to: its ALTERNATIVES entry, else one of the same type (a null key:
    the first of a few plain values its constructor accepts)."""
    if key in ALTERNATIVES:
        alt = ALTERNATIVES[key]
        return [alt.get(cfg.model._target_, next(iter(alt.values())))] if key == "model.loss" else [alt]
    if value is None:
        return [3, 0.25, "x", True, ["x"]]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 0.5 + 0.125]
    if isinstance(value, str):
        return [value + "x"]
    if isinstance(value, list):
        return [value[:-1] if len(value) > 1 else [*value, *value] if value else [5]]
    if isinstance(value, dict):
        return [{**value, "x": 1}]
    raise AssertionError(f"{key}: no value to switch to from {value!r}; add one to ALTERNATIVES")


def _cases() -> list[tuple[str, Path, str]]:
    cases = []
    for group, path in config_files():
        if group.split("/")[0] in DELTA_GROUPS:
            continue
        package = "" if group == "" else _package(path)
        node = OmegaConf.load(path)
        for leaf in _leaves(node, package or ""):
            if leaf != package:  # an empty option (logger=none) sets nothing
                cases.append((group, path, leaf))
    return cases


@contextlib.contextmanager
def _patched(cfg: DictConfig, raw: dict[str, Any], values: dict[str, Any]) -> Iterator[None]:
    """``cfg`` with ``values`` set (as command-line overrides would), restored from ``raw`` afterwards."""
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        yield
    finally:
        for key in values:
            node: Any = raw
            for part in key.split("."):
                node = node[part]
            OmegaConf.update(cfg, key, node, merge=False)


def _section(key: str) -> str:
    top = key.split(".")[0]
    return top if top in ("data", "model", "trainer", "callbacks", "logger", "privacy", "paths") else ""


def _skipped(key: str) -> bool:
    return (key in INFORMATIONAL or key.startswith("hydra.")
            or key.startswith("data.engine.")  # ENGINE_REASON
            or key.startswith("callbacks.progress_bar."))  # the bar's refresh rate shows only on a terminal


def test_every_leaf_key_of_every_config_group_changes_what_is_built(tmp_path):
    by_file: dict[tuple[str, Path], list[str]] = {}
    for group, path, key in _cases():
        if not _skipped(key):
            by_file.setdefault((group, path), []).append(key)
    composed: dict[tuple[str, ...], DictConfig] = {}
    failures: list[str] = []
    checked = 0
    for (group, path), keys in by_file.items():
        selection = tuple(_selection(group, path))
        if selection not in composed:
            composed[selection] = _compose(list(selection), tmp_path)
        cfg = composed[selection]
        raw = OmegaConf.to_container(cfg, resolve=False)
        bases: dict[tuple[str, str], Any] = {}
        for key in keys:
            section, companions = _section(key), COMPANIONS.get(key, {})
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            with _patched(cfg, raw, companions):
                if (section, str(companions)) not in bases:
                    bases[section, str(companions)] = describe(_build(cfg, section))
                base = bases[section, str(companions)]
                problems = []
                for new_value in _candidates(key, value, cfg):
                    try:
                        with _patched(cfg, raw, {key: new_value}):
                            after = describe(_build(cfg, section))
                    except ConfigError as exc:
                        if exc.key == key:
                            break  # rejected naming the key: it is read and checked
                        problems.append(f"{key}={new_value!r} raised {exc}")
                        continue
                    except Exception as exc:  # noqa: BLE001  (reported with the key, below)
                        problems.append(f"{key}={new_value!r} raised {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:200]}")
                        continue
                    if after != base:
                        break
                    problems.append(f"{key}: {value!r} -> {new_value!r} changed nothing built")
                else:
                    failures.append(f"{path.relative_to(ROOT)}: " + "; ".join(problems))
            checked += 1
    assert not failures, "\n".join(failures)
    assert checked > 100  # the walk reached the groups


def _constructor_takes(cfg: DictConfig, key: str) -> bool:
    """A key not in the config is still fine when the ``_target_`` above it takes that argument."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    try:
        check_constructor_args(node._target_, {name: OmegaConf.select(cfg, key)}, parent)
    except ConfigError:
        return False
    return True


def test_delta_files_set_only_known_keys(tmp_path):
    """Experiment, debug and sweep files set keys of the groups: a typo (or a key that moved) would
    otherwise be added silently to the composed config and read by nothing."""
    bases: dict[tuple[str, ...], DictConfig] = {}
    unknown: list[str] = []
    for path in sorted(p for g in DELTA_GROUPS for p in (CONF / g).glob("*.yaml")):
        group = path.parent.name
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            full = compose(config_name="train", overrides=[f"{group}={path.stem}", f"paths.output_dir={tmp_path}"],
                           return_hydra_config=True)
        picked = tuple(f"{g}={o}" for g, o in full.hydra.runtime.choices.items()
                       if not g.startswith("hydra") and o is not None and g not in DELTA_GROUPS and "/" not in g)
        if picked not in bases:
            bases[picked] = _compose(list(picked), tmp_path)
        node = OmegaConf.load(path)
        keys = [k for k in _leaves(node, "") if not k.startswith("hydra.")]
        if group == "hparams_search":
            keys += list(node.hydra.sweeper.params)
        unknown += [f"{path.relative_to(ROOT)}: {k}" for k in keys
                    if OmegaConf.select(bases[picked], k, default="<missing>",
                                        throw_on_resolution_failure=False) == "<missing>"
                    and not _constructor_takes(full, k)]
    assert not unknown, f"keys no group has: {unknown}"


def test_the_informational_list_names_only_existing_keys():
    known = {key for _, _, key in _cases()}
    assert not set(INFORMATIONAL) - known and set(MODEL_SHORTHANDS) == {"dim"}
