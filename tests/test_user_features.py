"""Optional user-side features for the two-tower query tower: encoding, training, export, serving."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rectrain.errors import ConfigError
from rectrain.features import UserFeatureEncoder, user_feature_matrix
from rectrain.training import train
from tests.conftest import TINY_DATA
from tests.test_export_fixtures import assert_same_topk, load_net, torch_topk


def test_encoder_standardises_numbers_and_one_hots_categories():
    table = {"age": np.array([20.0, 30.0, np.nan, 40.0]), "gender": np.array(["F", "M", "", "M"], dtype=object)}
    enc = UserFeatureEncoder.fit(table, ["age", "gender"])
    assert enc.names == ["age", "gender=F", "gender=M"] and enc.width == 3
    std = np.std([20.0, 30.0, 40.0])
    want = np.array([[-10 / std, 1, 0], [0, 0, 1], [0, 0, 0], [10 / std, 0, 1]], dtype=np.float32)  # NaN, "" -> 0
    np.testing.assert_allclose(enc.encode_columns(table, 4), want, rtol=1e-6)
    # a serving request encodes the same way; unseen values and missing attributes are "unknown"
    records = [{"age": 20, "gender": "F"}, {"age": 30, "gender": "M"}, {}, {"age": 40.0, "gender": "M"}]
    np.testing.assert_allclose(enc.encode_records(records), want, rtol=1e-6)
    assert enc.encode_records([{"gender": "X"}]).tolist() == [[0.0, 0.0, 0.0]]
    again = UserFeatureEncoder.from_dict(enc.to_dict())
    assert again == enc
    with pytest.raises(KeyError):
        enc.encode_records([{"shoe_size": 42}])
    with pytest.raises(ValueError, match="'age' must be a finite number"):
        enc.encode_records([{"age": "old"}])
    with pytest.raises(KeyError):
        UserFeatureEncoder.fit(table, ["zip"])
    assert user_feature_matrix(None, table, 4) is None


def test_synthetic_user_table_survives_the_cache(compose_cfg):
    from rectrain.training import build

    cfg = compose_cfg(*TINY_DATA)
    first = build(cfg.data)
    first.setup()
    cached = build(cfg.data)
    cached.setup()  # from the cache this time
    assert sorted(cached.data.user_attributes) == ["age", "region"]
    for name, values in first.data.user_attributes.items():
        assert values.shape == (first.data.n_users,)
        np.testing.assert_array_equal(cached.data.user_attributes[name], values)
    assert cached.data.user_attributes["age"].dtype == np.float64
    assert set(cached.data.user_attributes["region"]) <= {f"r{i}" for i in range(4)}


@pytest.mark.parametrize("overrides, key, message", [
    (["model=mf"], "data.user_features", "does not read user features"),
    (["model=two_tower", "data.user_features=[age,shoe_size]"], "data.user_features", "unknown user attribute 'shoe_size'"),
])
def test_user_feature_config_errors_name_the_key(compose_cfg, overrides, key, message):
    cfg = compose_cfg(*TINY_DATA, "data.user_features=[age,region]", "logger=none", "trainer.max_epochs=1", *overrides)
    with pytest.raises(ConfigError, match=message) as info:
        train(cfg)
    assert info.value.key == key


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-tower model trained with [age, region], exported to ONNX."""
    from rectrain.export import export_checkpoint
    from tests.test_export_fixtures import LEAN, _compose

    tmp = tmp_path_factory.mktemp("user-features")
    cfg = _compose([*TINY_DATA, "model=two_tower", "model.dim=16", "model.net.hidden=16", "model.net.max_length=10",
                    "data.user_features=[age,region]", "data.batch_size=64", *LEAN, "trainer.max_epochs=2", "test=true",
                    f"paths.output_dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}"])
    results = train(cfg)
    report = export_checkpoint(results["best_checkpoint"], tmp / "tt.onnx")
    return results, report


def test_query_tower_reads_the_features_and_the_checkpoint_holds_no_user_values(trained):
    results, _ = trained
    assert 0 < results["test"]["hr@10"] <= 1
    net, facts = load_net(results["best_checkpoint"])
    width = UserFeatureEncoder.from_dict(facts["user_features"]).width
    assert facts["user_features"]["names"][:1] == ["age"] and width == 5  # age + region r0..r3
    assert net.n_user_features == width and net.query_tower.project.in_features == 16 + width
    ckpt = torch.load(results["best_checkpoint"], weights_only=True)
    n_users = facts["n_users"]
    for name, tensor in ckpt["state_dict"].items():  # no per-user table, no user's attributes
        assert n_users not in tensor.shape[:1], name
    # the features move the query: same history, different attributes -> different scores
    history, lengths = torch.tensor([[3, 5, 7]]), torch.tensor([3])
    young = torch.zeros(1, width)
    old = young.clone()
    old[0, 0] = 2.0
    with torch.no_grad():
        assert not torch.allclose(net(history, lengths, young), net(history, lengths, old))
    with pytest.raises(ValueError, match="reads 5 user features"):
        net(history, lengths)


def test_export_and_scorer_encode_user_features_like_training(trained):
    from rectrain.serving import Scorer
    from rectrain.serving.scorer import RequestError

    results, report = trained
    net, facts = load_net(results["best_checkpoint"])
    encoder = UserFeatureEncoder.from_dict(facts["user_features"])
    assert all(p["max_abs_diff"] <= 1e-5 for p in report.parity.values())
    scorer = Scorer.load(report.files["recommend"])
    assert [i.name for i in scorer.model.session.get_inputs()] == ["history", "lengths", "user_features", "exclude", "k"]
    vocab = facts["item_vocab"]
    history = [2, 9, 4]
    attributes = {"age": 61, "region": "r2"}
    answer = scorer.recommend(history=[vocab[i] for i in history], user_features=attributes, k=10)
    features = torch.from_numpy(encoder.encode_records([attributes]))
    with torch.no_grad():
        full = net(torch.tensor([history]), torch.tensor([3]), features)
    want, _ = torch_topk(full, [sorted(set(history))], 10)
    got = [vocab.index(i) for i in answer["items"]]
    assert_same_topk(got, want[0], full[0].numpy())
    np.testing.assert_allclose(answer["scores"], full[0].numpy()[got], rtol=1e-5, atol=1e-5)
    # /score agrees, and other attributes give other scores
    scored = scorer.score(history=[vocab[i] for i in history], user_features=attributes, items=answer["items"])
    np.testing.assert_allclose(scored["scores"], answer["scores"], rtol=1e-5, atol=1e-5)
    other = scorer.score(history=[vocab[i] for i in history], user_features={"age": 18}, items=answer["items"])
    assert not np.allclose(other["scores"], scored["scores"])
    for bad, message in (({"shoe_size": 1}, "unknown user feature 'shoe_size'"),
                         ({"age": "old"}, "'age' must be a finite number"),
                         ([61], "'user_features' must be an object")):
        with pytest.raises(RequestError, match=message) as info:
            scorer.recommend(history=[vocab[2]], user_features=bad)
        assert info.value.status == 400
