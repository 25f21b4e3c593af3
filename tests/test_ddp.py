"""DDP on CPU (gloo, 2 processes): ranking metrics are gathered, not averaged per rank."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from rectrain.runs import load_checkpoint, rebuild_model
from rectrain.evaluation.ranking import evaluate_ranking
from rectrain.training import build
from tests.conftest import ROOT

TINY = ["data.source.n_users=150", "data.source.n_items=90", "data.source.mean_length=20", "data.batch_size=256",
        "data.eval_batch_size=37"]  # an eval batch that does not divide the queries: uneven shards


@pytest.mark.slow
def test_two_process_validation_equals_single_process(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_epochs=2", "logger=none", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
         "model=mf", *TINY, f"hydra.run.dir={run}", f"paths.cache_dir={cache}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())

    # the same checkpoint evaluated in this single process
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=mf", *TINY, f"paths.output_dir={run}",
                                                       f"paths.cache_dir={cache}"])
    dm = build(cfg.data)
    dm.setup()
    net = rebuild_model(load_checkpoint(results["best_checkpoint"]))
    queries = dm.queries("valid")
    with torch.no_grad():
        single = evaluate_ranking(lambda q, rows: net.score_all(torch.as_tensor(q.users[rows])), queries,
                                  ks=(10, 20), item_popularity=dm.item_popularity("valid"),
                                  n_users_popularity=dm.data.n_users).summary()
    for key, value in results["valid"].items():
        assert value == pytest.approx(single[key], abs=1e-6), key
