"""Shared fixtures: tiny generated data, the real Hydra config composed and shrunk."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Two CPU cores on CI: one intra-op thread per test process avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose conf/train.yaml with overrides, shrunk for tests and writing under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    "trainer.accelerator=cpu",
                    "trainer.enable_progress_bar=false",
                    "callbacks.progress_bar=null",
                    "trainer.enable_model_summary=false",
                    *overrides,
                ],
            )
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


TINY_DATA = [
    "data.source.n_users=120",
    "data.source.n_items=80",
    "data.source.mean_length=20",
    "data.batch_size=256",
]
