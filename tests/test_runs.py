"""rectrain.runs: the one way to open a trained run (net, kind, sha256, data, user vocabulary)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rectrain.errors import RectrainError
from rectrain.runs import USER_VOCAB_FILE, model_kind, open_run
from rectrain.utils.io import file_sha256

pytest_plugins = ["tests.test_export_fixtures"]


def test_open_run_gives_net_kind_sha_data_and_checked_user_vocab(checkpoints):
    run = open_run(checkpoints["neumf"])
    assert run.kind == "ncf" and type(run.net).__name__ == "NeuMF" and not run.net.training
    assert run.sha256 == file_sha256(checkpoints["neumf"])
    data = run.data()
    assert data.fingerprint == run.facts["data_fingerprint"] and run.data() is data  # built once
    vocab = run.user_vocab()
    assert len(vocab.ids) == data.n_users == run.facts["n_users"]
    assert vocab.ids == [str(u) for u in data.user_vocab.tolist()]
    assert open_run(checkpoints["two_tower"]).kind == "two_tower"


def test_a_user_vocabulary_of_another_run_is_refused(checkpoints, tmp_path):
    """compare.py replays NCF users through the run's vocabulary: never through another run's."""
    copy = tmp_path / checkpoints["neumf"].name
    shutil.copy(checkpoints["neumf"], copy)
    run = open_run(copy)
    with pytest.raises(RectrainError, match="not found"):
        run.user_vocab()
    ids = json.loads((checkpoints["neumf"].parent / USER_VOCAB_FILE).read_text())["user_vocab"]
    (tmp_path / USER_VOCAB_FILE).write_text(json.dumps({"user_vocab": ids[::-1]}))
    with pytest.raises(RectrainError, match="does not match the checkpoint's user_vocab_sha256"):
        run.user_vocab()


def test_only_data_overrides_are_accepted_and_other_data_is_refused(checkpoints):
    with pytest.raises(RectrainError, match="only data"):
        open_run(checkpoints["neumf"], ["model.dim=3"])
    run = open_run(checkpoints["neumf"], ["data.source.n_items=77"])
    with pytest.raises(RectrainError, match="not the data it was trained on"):
        run.data()


def test_model_kind_is_decided_by_the_interface():
    class Query(torch.nn.Module):
        def query(self): ...
        def item_vectors(self): ...

    class Scores(torch.nn.Module):
        def score_all(self): ...

    assert model_kind(Query()) == "two_tower" and model_kind(Scores()) == "ncf"
    with pytest.raises(RectrainError, match="neither"):
        model_kind(torch.nn.Linear(2, 2))
