"""Calibration: metrics by hand, Platt scaling on known probabilities, the negative-sampling
correction, the weighted evaluation pairs, and the stored result of a tiny trained model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rectrain.analytics.calibration import (
    calibration_metrics,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    log_loss,
    negative_sampling_rate,
    reliability_bins,
)
from rectrain.artifacts import Calibration, sigmoid
from rectrain.errors import RectrainError
from tests.conftest import ROOT, TINY_DATA


def test_ece_and_log_loss_by_hand():
    p = np.array([0.1, 0.1, 0.9, 0.95, 0.5])
    y = np.array([0, 1, 1, 1, 0])
    # 15 bins of width 1/15: 0.1 -> bin 1, 0.5 -> bin 7, 0.9 and 0.95 -> bin 13 and 14
    # |0.1 - 0.5| * 2/5 + |0.5 - 0| * 1/5 + |0.9 - 1| / 5 + |0.95 - 1| / 5
    assert expected_calibration_error(p, y) == pytest.approx(0.4 * 0.4 + 0.1 + 0.02 + 0.01)
    # weights count as repeated rows
    w = np.array([1, 3, 1, 1, 2])
    rep = np.repeat(np.arange(5), w)
    assert expected_calibration_error(p, y, w) == pytest.approx(expected_calibration_error(p[rep], y[rep]))
    assert log_loss(p, y, w) == pytest.approx(log_loss(p[rep], y[rep]))
    assert log_loss(np.array([0.5]), np.array([1])) == pytest.approx(math.log(2))
    bins = reliability_bins(np.array([0.0, 1.0]), np.array([0, 1]))
    assert bins["weight"][0] == 1 and bins["weight"][-1] == 1  # both ends land in a bin
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_platt_scaling_fixes_mis_scaled_scores_with_known_probabilities():
    """True probabilities are known; the scores are an over-confident, shifted version of their logits."""
    rng = np.random.default_rng(0)
    n = 40_000
    true_logit = rng.normal(-1.5, 1.2, size=n)
    p_true = sigmoid(true_logit)
    y = (rng.random(n) < p_true).astype(float)
    scores = (true_logit - 1.0) / 0.4  # true_logit = 0.4 * score + 1.0
    fit, test = slice(0, n // 2), slice(n // 2, n)
    a, b = fit_platt(scores[fit], y[fit])
    assert a == pytest.approx(0.4, abs=0.03) and b == pytest.approx(1.0, abs=0.08)
    raw = calibration_metrics(sigmoid(scores[test]), y[test])
    calibrated = calibration_metrics(sigmoid(a * scores[test] + b), y[test])
    oracle = calibration_metrics(p_true[test], y[test])
    assert raw["ece"] > 0.1
    assert calibrated["ece"] < 0.02 and calibrated["ece"] < raw["ece"] / 5
    assert calibrated["log_loss"] < raw["log_loss"]
    assert calibrated["log_loss"] == pytest.approx(oracle["log_loss"], abs=0.005)
    # temperature only: b stays where it is put
    a_t, b_t = fit_platt(scores[fit], y[fit], init=(1.0, 1.0), fit_bias=False)
    assert b_t == 1.0 and a_t == pytest.approx(0.4, abs=0.03)


def test_negative_sampling_correction_recovers_the_true_base_rate():
    """A population of pairs with a 1% base rate; training keeps every positive and a fraction r of the
    negatives. A model fitted on that mix over-predicts; log(r) in the bias restores the base rate, and a
    fit on sampled pairs weighted by 1/r recovers the true model."""
    rng = np.random.default_rng(1)
    n = 400_000
    x = rng.normal(size=n)
    true_a, true_b = 1.5, -5.5
    y = (rng.random(n) < sigmoid(true_a * x + true_b)).astype(float)
    base_rate = y.mean()
    assert 0.005 < base_rate < 0.03
    n_pos, n_neg = int(y.sum()), int(n - y.sum())
    n_negatives = 4  # "negatives per positive", as model.negatives.n
    r = negative_sampling_rate(n_negatives, n_pos, n_neg)
    assert r == pytest.approx(4 * n_pos / n_neg)
    keep = (y == 1) | (rng.random(n) < r)
    # the model trained on the mix (a logistic regression on x: the Bayes-optimal score of the mix)
    a_mix, b_mix = fit_platt(x[keep], y[keep])
    assert a_mix == pytest.approx(true_a, abs=0.1)
    assert b_mix == pytest.approx(true_b - math.log(r), abs=0.1)
    assert sigmoid(a_mix * x + b_mix).mean() > 5 * base_rate  # raw mix probabilities are far off
    corrected = sigmoid(a_mix * x + b_mix + math.log(r))
    assert corrected.mean() == pytest.approx(base_rate, rel=0.05)
    # sampled negatives weighted by 1 / r stand for all of them
    weights = np.where(y[keep] == 1, 1.0, 1.0 / r)
    assert np.average(y[keep], weights=weights) == pytest.approx(base_rate, rel=0.05)
    a_w, b_w = fit_platt(x[keep], y[keep], weights)
    assert a_w == pytest.approx(true_a, abs=0.1) and b_w == pytest.approx(true_b, abs=0.1)
    # fit_calibration on the model's mix logits: starts from the prior correction, lands on the truth
    cal = fit_calibration(a_mix * x[keep] + b_mix, y[keep], weights, sampling_rate=r)
    assert cal.prior_correction == pytest.approx(math.log(r))
    assert cal.a == pytest.approx(1.0, abs=0.08) and cal.b == pytest.approx(math.log(r), abs=0.1)
    assert calibration_metrics(cal.probability(a_mix * x + b_mix), y)["ece"] < 0.002


def test_bad_calibration_inputs():
    with pytest.raises(RectrainError, match="both positive and negative"):
        fit_platt(np.zeros(4), np.zeros(4))
    with pytest.raises(RectrainError, match="NaN"):
        fit_platt(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(RectrainError, match="method"):
        fit_calibration(np.array([0.0, 1.0]), np.array([0.0, 1.0]), method="isotonic")
    with pytest.raises(RectrainError, match="unobserved"):
        negative_sampling_rate(4, 10, 0)
    cal = Calibration("platt", 2.0, -1.0, "ncf_logit")
    assert cal.probability(np.array([0.5]))[0] == pytest.approx(0.5)
    assert Calibration.from_dict({**cal.to_dict(), "future_field": 1}) == cal


# --- the evaluation pairs and the whole step on a tiny trained model ----------------------------------
@pytest.fixture(scope="module")
def tiny_mf(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rectrain.training import train

    base = tmp_path_factory.mktemp("calibration")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={base / 'mf'}", f"paths.cache_dir={base / 'cache'}", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.item_embeddings=null",
            "trainer.enable_model_summary=false", "logger=none", "trainer.max_epochs=2", "model=mf", "test=false",
            *TINY_DATA, "data.source.n_items=300", "data.source.n_users=200"])
    GlobalHydra.instance().clear()
    return Path(train(cfg)["best_checkpoint"])


def test_calibration_pairs_stand_for_every_unconsumed_pair(tiny_mf):
    from rectrain.analytics.calibration import calibration_pairs
    from rectrain.analytics.common import load_model_and_data

    data = load_model_and_data(tiny_mf).data()
    pairs = calibration_pairs(data, "valid", negatives=30, seed=0)
    users = pairs.queries.users[pairs.rows]
    everything = {(int(u), int(i)) for split in (data.train, data.valid, data.test) for u, i in zip(split.user, split.item)}
    negatives = pairs.labels == 0
    assert not any((int(u), int(i)) in everything for u, i in zip(users[negatives], pairs.items[negatives]))
    # positives: exactly the validation events
    assert sorted(zip(users[~negatives].tolist(), pairs.items[~negatives].tolist())) == sorted(
        zip(data.valid.user.tolist(), data.valid.item.tolist()))
    # per user, the weights add up to (held-out positives + never-consumed items)
    consumed = {u: len({i for uu, i in everything if uu == u}) for u in set(users.tolist())}
    per_user = np.bincount(users, weights=pairs.weights, minlength=data.n_users)
    for u in list(consumed)[:20]:
        assert per_user[u] == pytest.approx(1 + data.n_items - consumed[u])
    # same seed, same pairs
    again = calibration_pairs(data, "valid", negatives=30, seed=0)
    np.testing.assert_array_equal(again.items, pairs.items)


def test_calibrate_checkpoint_improves_test_calibration_and_stores_it(tiny_mf, tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    from rectrain.analytics.calibration import calibrate_checkpoint, load_calibration
    from rectrain.utils.io import file_sha256

    report = calibrate_checkpoint(tiny_mf, negatives=50, seed=0, report_dir=tmp_path / "report", into_checkpoint=True)
    test = report.metrics["test"]
    assert set(test) == {"raw", "prior", "calibrated"}
    assert test["calibrated"]["ece"] < test["raw"]["ece"] / 3
    assert test["calibrated"]["log_loss"] < test["raw"]["log_loss"]
    assert test["calibrated"]["mean_p"] == pytest.approx(test["calibrated"]["base_rate"], rel=0.5)
    cal = report.calibration
    assert cal.method == "platt" and cal.fitted_on == "valid" and cal.score == "ncf_logit"
    assert cal.negative_sampling_rate > 0 and cal.prior_correction == pytest.approx(math.log(cal.negative_sampling_rate))
    assert cal.details["training"] == {"kind": "ncf", "loss": "bce", "negatives_per_positive": 4, "negatives_alpha": 0.0}

    sha = file_sha256(tiny_mf)
    stored = json.loads((tiny_mf.parent / "calibration.json").read_text())
    assert stored["format"] == 1 and set(stored["checkpoints"]) == {sha}
    entry = stored["checkpoints"][sha]
    assert (entry["method"], entry["a"], entry["b"]) == ("platt", cal.a, cal.b)
    assert load_calibration(tiny_mf) == Calibration.from_dict(entry)
    # the copy carries it in the checkpoint and still loads safely
    copy = tiny_mf.with_name(f"{tiny_mf.stem}.calibrated.ckpt")
    carried = torch.load(copy, map_location="cpu", weights_only=True)["rectrain"]["calibration"]
    assert carried["a"] == cal.a and load_calibration(copy).b == cal.b
    assert (tmp_path / "report" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    meta = cal.metadata()
    assert {"method", "a", "b", "score", "formula"} <= set(meta)
    json.dumps(meta)  # fits ONNX string metadata

    # a temperature fit keeps b at the prior correction; the file keeps both checkpoints' entries
    other = tmp_path / "cal.json"
    (other).write_text(json.dumps({"format": 1, "checkpoints": {"f" * 64: {"method": "platt", "a": 1, "b": 0,
                                                                           "score": "ncf_logit"}}}))
    temp = calibrate_checkpoint(tiny_mf, negatives=20, method="temperature", output=other, report_dir=tmp_path / "r2")
    assert temp.calibration.b == pytest.approx(math.log(cal.negative_sampling_rate))
    assert set(json.loads(other.read_text())["checkpoints"]) == {"f" * 64, sha}


def test_calibrate_command_rejects_bad_input(tiny_mf, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_cli", ROOT / "calibrate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for argv, message in (([], "ckpt_path=<checkpoint> is required"),
                          ([f"ckpt_path={tiny_mf}", "method=isotonic"], "method must be platt or temperature"),
                          ([f"ckpt_path={tiny_mf}", "negatives=0"], "must be >= 1"),
                          ([f"ckpt_path={tmp_path / 'x.ckpt'}"], "checkpoint not found"),
                          ([f"ckpt_path={tiny_mf}", "data.source.n_items=99"], "not the data it was trained on")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "c.json"
    assert cli.main([f"ckpt_path={tiny_mf}", "negatives=10", "max_users=50", f"output={out}",
                     f"report={tmp_path / 'rep'}"]) == 0
    assert "calibrated (Platt)" in capsys.readouterr().out and out.is_file()
