"""Segments and calibration travel through the ONNX export to the torch-free scorer and match torch."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rectrain.analytics.calibration import calibrate_checkpoint, load_calibration
from rectrain.analytics.reports import segment_checkpoint
from rectrain.artifacts import assign_segments, load_segments
from rectrain.runs import load_checkpoint, rebuild_model
from rectrain.export import export_checkpoint
from rectrain.serving import Scorer

pytest_plugins = ["tests.test_export_fixtures"]


def _copy(ckpt, tmp_path):
    """A private copy (segments/calibration files are written beside the checkpoint)."""
    dest = tmp_path / ckpt.name
    shutil.copy(ckpt, dest)
    sidecar = ckpt.parent / "user_vocab.json"
    if sidecar.exists():
        shutil.copy(sidecar, tmp_path / "user_vocab.json")
    return dest


@pytest.mark.slow
def test_two_tower_segment_matches_torch(checkpoints, tmp_path):
    ckpt = _copy(checkpoints["two_tower"], tmp_path)
    segment_checkpoint(ckpt, k=3, seed=0)
    out = tmp_path / "tt.onnx"
    export_checkpoint(ckpt, out)
    scorer = Scorer.load(out)
    payload = load_segments(tmp_path / f"{ckpt.stem}-segments" / "segments.json")
    net = rebuild_model(load_checkpoint(ckpt))
    vocab = scorer.model.item_vocab
    histories = [[1, 2, 3], [5], [7, 8, 9, 10, 11]]
    for hist in histories:
        answer = scorer.recommend(history=[vocab[i] for i in hist], k=5)
        with torch.no_grad():
            q = net.query(torch.tensor([hist]), torch.tensor([len(hist)])).numpy()
        expected = assign_segments(q, payload["centroids"], normalize=True)[0]
        assert answer["segment"] == expected
        assert scorer.segment(history=[vocab[i] for i in hist]) == {"segment": expected, "k": 3, "cold_start": False}
    cold = scorer.recommend(history=[], k=5)
    assert cold["cold_start"] and cold["segment"] is None


@pytest.mark.slow
def test_ncf_calibrated_probabilities_and_user_segments(checkpoints, tmp_path):
    ckpt = _copy(checkpoints["neumf"], tmp_path)
    calibrate_checkpoint(ckpt, negatives=20, seed=0)
    cal = load_calibration(ckpt)
    assert cal is not None
    segment_checkpoint(ckpt, k=2, seed=0)
    out = tmp_path / "m.onnx"
    export_checkpoint(ckpt, out)
    scorer = Scorer.load(out)
    user = scorer.model.user_index and next(iter(scorer.model.user_index))
    items = scorer.model.item_vocab[:4]
    answer = scorer.score(user=user, items=items, calibrated=True)
    expected = 1 / (1 + np.exp(-(cal.a * np.asarray(answer["scores"]) + cal.b)))
    np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-6)
    assert all(0 < p < 1 for p in answer["probabilities"])
    assert "probabilities" not in scorer.score(user=user, items=items)
    rec = scorer.recommend(user=user, k=3)
    assert rec["segment"] in (0, 1)
