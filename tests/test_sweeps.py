"""`train.py -m`: per-run results, a sweep summary, failed runs recorded, Optuna trials."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT

TINY = ["data.source.n_users=150", "data.source.n_items=90", "data.source.mean_length=20", "trainer.max_epochs=1",
        "logger=none", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        "callbacks.item_embeddings=null"]


def _multirun(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.slow
def test_multirun_writes_results_and_a_summary_and_survives_a_nan_run(tmp_path):
    proc = _multirun(tmp_path, "model=mf,gmf", "model.loss=bpr", "model.optimizer.lr=0.002,1e30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = {" ".join(r["overrides"][:3]): r for r in
               (json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json")))}
    assert len(results) == 4
    for model in ("mf", "gmf"):
        assert results[f"model={model} model.loss=bpr model.optimizer.lr=0.002"]["status"] == "completed"
    # GMF diverges at this learning rate: recorded as failed with the NaN guard's reason, sweep goes on
    diverged = results["model=gmf model.loss=bpr model.optimizer.lr=1e+30"]
    assert diverged["status"] == "failed" and "not finite" in diverged["reason"]
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 4
    assert table["status"].iloc[-1] == "failed"  # best first, failed last
    assert table["val/ndcg@10"][0] >= table["val/ndcg@10"][1]
    assert "Sweep summary" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_optuna_sweep_runs_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _multirun(tmp_path, "hparams_search=neumf_optuna", "hydra.sweeper.n_trials=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 2 and all(r["status"] == "completed" for r in results)
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
    assert len(pd.read_csv(sweep / "summary.csv")) == 2
