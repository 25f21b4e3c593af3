"""Shared by the export and serving tests: tiny trained models and their exports (no tests here).

Both test modules import these session fixtures; the models are trained once per pytest session
and reused from disk by whichever module asks second.
"""
from __future__ import annotations

import hashlib
import json
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: 300 generated users x 150 items -> 266 users, 128 items after the 5-core filter
DATA = ["data.source.n_users=300", "data.source.n_items=150", "data.source.mean_length=20", "data.batch_size=256"]
MODELS = {
    # with a repeat bonus, so export, parity and both scorer paths are checked with it
    "two_tower": ["model=two_tower", "model.dim=16", "model.net.hidden=32", "model.net.max_length=20",
                  "model.net.repeat_slots=3", "data.batch_size=64"],
    "neumf": ["model=neumf", "model.optimizer.lr=0.01"],
}
LEAN = ["logger=none", "callbacks.item_embeddings=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "test=false"]


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / f"shared-{name}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model name -> best checkpoint of a one-epoch run on tiny generated data."""
    from rectrain.training import train

    out: dict[str, Path] = {}
    for name, overrides in MODELS.items():
        run = _shared_dir(tmp_path_factory, f"run-{name}")
        marker = run / "best_checkpoint.txt"
        if not marker.exists():
            with warnings.catch_warnings():  # Lightning's notices about tiny data loaders and folders
                warnings.simplefilter("ignore")
                results = train(_compose([*DATA, *overrides, *LEAN, f"paths.output_dir={run}",
                                          f"paths.cache_dir={_shared_dir(tmp_path_factory, 'cache')}"]))
            marker.write_text(results["best_checkpoint"])
        out[name] = Path(marker.read_text())
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """model name -> main .onnx file exported from ``checkpoints`` (two-tower also quantised)."""
    from rectrain.export import export_checkpoint

    out: dict[str, Path] = {}
    for name, ckpt in checkpoints.items():
        folder = _shared_dir(tmp_path_factory, f"export-{name}")
        path = folder / f"{name}.onnx"
        if not (folder / "done").exists():
            export_checkpoint(ckpt, path, quantize=name == "two_tower")
            (folder / "done").write_text("")
        out[name] = path
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_net(ckpt: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from rectrain.runs import load_checkpoint, rebuild_model

    ckpt_data = load_checkpoint(ckpt)
    return rebuild_model(ckpt_data), ckpt_data["rectrain"]


def validation_queries(ckpt: Path) -> Any:
    """The validation queries of the data a checkpoint was trained on (opened as a run)."""
    from rectrain.runs import open_run

    return open_run(ckpt).data().ranking_queries("valid")


def torch_topk(scores: torch.Tensor, exclude: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The evaluator's top-k (tie rule: lower index first) after setting excluded items to -inf."""
    from rectrain.evaluation.ranking import tie_ordered_topk

    masked = scores.clone()
    for row, items in enumerate(exclude):
        if items:
            masked[row, torch.tensor(items)] = float("-inf")
    values, items = tie_ordered_topk(masked, k)
    return items.numpy(), values.numpy()


def assert_same_topk(got: list[int], want: np.ndarray, full_scores: np.ndarray, tol: float = 1e-5) -> None:
    """Identical lists, except that items whose torch scores tie (within ``tol``) may swap places."""
    want = [int(w) for w in want if w >= 0]
    assert len(got) == len(want), (got, want)
    for position, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert abs(full_scores[g] - full_scores[w]) <= tol * max(1.0, abs(full_scores[w])), \
                f"position {position}: got item {g} (score {full_scores[g]}), torch has {w} (score {full_scores[w]})"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(path)
    return {p.key.removeprefix("rectrain."): p.value for p in model.metadata_props}


def item_ids(facts: dict[str, Any], indices: Any) -> list[str]:
    vocab = facts["item_vocab"]
    return [str(vocab[int(i)]) for i in indices]


def json_meta(meta: dict[str, str], key: str) -> Any:
    return json.loads(meta[key])
