"""Offline A/B comparison: self-comparison is a tie, a clearly better model wins."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rectrain.ab_compare import (
    PopularityRecommender,
    bootstrap_ci,
    compare,
    per_request_metrics,
    permutation_p_value,
)
from tests.conftest import ROOT

pytest_plugins = ["tests.test_export_fixtures"]


class Fixed:
    """Answers with a list computed from the request (a stand-in for a model)."""

    def __init__(self, fn):
        self.fn = fn

    def recommend_many(self, requests):
        return [{"items": self.fn(r)} for r in requests]


def _requests(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [{"history": [str(x) for x in rng.integers(0, 50, 5)], "target": str(int(t))}
            for t in rng.integers(0, 50, n)]


def test_metrics_by_hand():
    answers = [{"items": ["a", "b", "c"]}, {"items": ["x", "y", "z"]}, {"items": ["t", "u"]}]
    requests = [{"target": "b"}, {"target": "q"}, {"targets": ["t", "u"]}]
    m = per_request_metrics(answers, requests, k=3)
    np.testing.assert_allclose(m["hr@3"], [1, 0, 1])
    np.testing.assert_allclose(m["mrr@3"], [0.5, 0, 1])
    np.testing.assert_allclose(m["ndcg@3"], [1 / np.log2(3), 0, 1.0])


def test_self_comparison_is_zero_with_a_ci_holding_zero():
    model = Fixed(lambda r: [str(i) for i in range(10)])
    report = compare(model, model, _requests(), k=10, n_boot=500, n_perm=500)
    for row in report["metrics"].values():
        assert row["diff"] == 0.0 and row["ci95"][0] <= 0.0 <= row["ci95"][1]
        assert row["p_value"] == 1.0
    assert report["verdict"] == "no significant difference"


def test_a_clearly_better_model_wins_and_the_seed_fixes_the_ci():
    rng = np.random.default_rng(1)
    reqs = [dict(r, history=r["history"] + [f"q{i}"]) for i, r in enumerate(_requests())]  # unique histories
    truth = {tuple(r["history"]): r["target"] for r in reqs}  # the models never see the target
    noisy_oracle = Fixed(lambda r: ([truth[tuple(r["history"])]] if rng.random() < 0.6 else []) + ["nope"] * 9)
    random_list = Fixed(lambda r: [str(i) for i in range(10)])
    report = compare(random_list, noisy_oracle, reqs, k=10, n_boot=500, n_perm=500, seed=3)
    row = report["metrics"]["ndcg@10"]
    assert row["diff"] > 0.3 and row["ci95"][0] > 0 and row["p_value"] < 0.01
    assert report["verdict"] == "B better"
    flipped = compare(noisy_oracle, random_list, reqs, k=10, n_boot=100, n_perm=100)
    assert flipped["verdict"] == "A better"


def test_bootstrap_and_permutation_are_seeded():
    diff = np.random.default_rng(0).normal(0.1, 1.0, 200)
    a = bootstrap_ci(diff, 300, np.random.default_rng(5))
    b = bootstrap_ci(diff, 300, np.random.default_rng(5))
    assert a == b and a[0] < diff.mean() < a[1]
    assert permutation_p_value(np.zeros(10), 100, np.random.default_rng(0)) == 1.0


def test_popularity_list_excludes_history():
    pop = PopularityRecommender(["a", "b", "c", "d"], np.array([5.0, 9.0, 9.0, 1.0]), mask_seen=True)
    out = pop.recommend_many([{"history": ["b"], "k": 2}, {"history": [], "k": 3, "exclude": ["c"]}])
    assert out[0]["items"] == ["c", "a"] and out[1]["items"] == ["b", "a", "d"]


@pytest.mark.slow
def test_compare_cli_on_exported_models(exports, checkpoints, tmp_path):
    model = exports["two_tower"]
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py"), f"a={model}", f"b={model}",
                           f"ckpt_path={checkpoints['two_tower']}", "bootstrap=200", f"output={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["verdict"] == "no significant difference"
    assert all(row["diff"] == 0.0 for row in report["metrics"].values())
    vs_pop = subprocess.run([sys.executable, str(ROOT / "compare.py"), "a=popularity", f"b={model}",
                             f"ckpt_path={checkpoints['two_tower']}", "bootstrap=200", f"output={tmp_path / 'p'}"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert vs_pop.returncode == 0, vs_pop.stderr[-2000:]
    assert "Verdict" in vs_pop.stdout
