"""ONNX export: graphs match torch, axes stay dynamic, files are self-describing and written atomically."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rectrain.export import ExportError, export_checkpoint, export_model
from rectrain.export.graphs import graph_specs
from rectrain.export.onnx_export import check_symbolic
from rectrain.models.ncf import GMF, MF, MLP, NeuMF
from rectrain.models.two_tower import TwoTower
from rectrain.utils.io import stable_hash
from tests.test_export_fixtures import (
    ROOT,
    assert_same_topk,
    json_meta,
    load_net,
    onnx_metadata,
    sha256,
    torch_topk,
    validation_queries,
)

# the session fixtures `checkpoints` and `exports` (tiny trained models and their exports)
pytest_plugins = ["tests.test_export_fixtures"]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_two_tower_export_matches_torch_on_unseen_shapes(checkpoints, exports):
    net, facts = load_net(checkpoints["two_tower"])
    path = exports["two_tower"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    # dynamic axes stayed symbolic (the trap: a trace example freezing batch or length)
    assert _dims(model.graph.input) == {"history": ["batch", "history_length"], "lengths": ["batch"],
                                        "exclude": ["batch", "n_exclude"], "k": []}
    assert _dims(model.graph.output) == {"items": ["batch", "k"], "scores": ["batch", "k"]}
    assert model.opset_import[0].version == 17

    # shapes the export's own parity check never used: batch 5, length 13, exclusion width 4, k 17
    rng = np.random.default_rng(1)
    n_items = facts["n_items"]
    history = rng.integers(0, n_items, size=(5, 13))
    lengths = np.array([13, 1, 7, 2, 13])
    exclude = rng.integers(-1, n_items, size=(5, 4))
    items, scores = _session(path).run(None, {"history": history, "lengths": lengths, "exclude": exclude,
                                              "k": np.array(17)})
    with torch.no_grad():
        full = net(torch.from_numpy(history), torch.from_numpy(lengths))  # (5, I)
    excluded = [[int(e) for e in row if e >= 0] for row in exclude]
    want, _ = torch_topk(full, excluded, 17)
    for row in range(5):
        assert not set(items[row].tolist()) & set(excluded[row])
        np.testing.assert_allclose(scores[row], full[row].numpy()[items[row]], rtol=1e-5, atol=1e-5)
        assert_same_topk(items[row].tolist(), want[row], full[row].numpy())

    # the ANN graphs: query . item_vectors + the query graph's repeat bonus is the recommend graph's score
    query, slot_values = _session(path.with_name("two_tower.query.onnx")).run(None, {"history": history,
                                                                                      "lengths": lengths})
    (vectors,) = _session(path.with_name("two_tower.item_vectors.onnx")).run(None, {"items": np.arange(n_items)})
    static = np.array(json_meta(onnx_metadata(path), "repeat_bonus"), dtype=np.float32)
    assert slot_values.shape == (5, 3) and np.abs(static).max() > 0  # trained away from its zero start
    np.testing.assert_allclose(slot_values, np.broadcast_to(static, (5, 3)), rtol=1e-5, atol=1e-6)  # no gate
    with_bonus = query @ vectors.T
    for row in range(5):
        for back, item in enumerate(history[row, :lengths[row]][::-1]):
            with_bonus[row, item] += slot_values[row, min(back, 2)]
    np.testing.assert_allclose(with_bonus, full.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(query @ vectors.T, full.numpy(), rtol=1e-5, atol=1e-5)
    some = np.array([5, 0, 5])
    (picked,) = _session(path.with_name("two_tower.item_vectors.onnx")).run(None, {"items": some})
    np.testing.assert_array_equal(picked, vectors[some])
    for name, dims in (("query", {"history": ["batch", "history_length"], "lengths": ["batch"]}),
                       ("item_vectors", {"items": ["n"]})):
        assert _dims(onnx.load(path.with_name(f"two_tower.{name}.onnx")).graph.input) == dims


def test_two_tower_metadata_is_self_describing(checkpoints, exports):
    _, facts = load_net(checkpoints["two_tower"])
    meta = onnx_metadata(exports["two_tower"])
    results = json.loads((checkpoints["two_tower"].parent.parent / "results.json").read_text())
    assert meta["model_kind"] == "two_tower" and meta["graph"] == "recommend" and meta["opset"] == "17"
    assert json_meta(meta, "item_vocab") == [str(v) for v in facts["item_vocab"]]
    assert json_meta(meta, "item_popularity") == facts["item_popularity"]
    assert len(json_meta(meta, "item_titles")) == facts["n_items"]
    assert meta["max_length"] == "20" and json_meta(meta, "mask_seen") is True
    assert [(t["name"], t["dtype"], t["shape"]) for t in json_meta(meta, "inputs")] == [
        ("history", "int64", ["batch", "history_length"]), ("lengths", "int64", ["batch"]),
        ("exclude", "int64", ["batch", "n_exclude"]), ("k", "int64", [])]
    assert [(t["name"], t["dtype"]) for t in json_meta(meta, "outputs")] == [("items", "int64"), ("scores", "float32")]
    assert meta["config_hash"] == stable_hash(facts["config"])
    assert meta["model_config_hash"] == results["config_hash"]  # traceable to the training run
    assert json_meta(meta, "validation_metrics") == {"source": "results.json", "metrics": results["valid"]}
    assert meta["version"] == facts["rectrain_version"] and meta["data_fingerprint"] == facts["data_fingerprint"]
    assert json_meta(meta, "user_vocab")["file"] is None  # no user ids in a two-tower model
    companions = json_meta(meta, "companions")
    assert set(companions) == {"query", "item_vectors"}
    for companion in companions.values():
        assert sha256(exports["two_tower"].parent / companion["file"]) == companion["sha256"]
    parity = json_meta(meta, "parity")
    assert parity["cases"] == 9 and parity["max_abs_diff"] <= 1e-5 and parity["topk_positions_compared"] > 0


def test_quantized_model_reports_its_validation_ndcg(checkpoints, exports):
    results = json.loads((checkpoints["two_tower"].parent.parent / "results.json").read_text())
    int8 = exports["two_tower"].with_name("two_tower.int8.onnx")
    onnx.checker.check_model(onnx.load(int8))
    quant = json_meta(onnx_metadata(int8), "quantization")
    assert quant["k"] == 10 and quant["split"] == "valid"
    # the float ONNX graph ranks the validation split like the torch evaluator did during training
    assert quant["float"]["ndcg@10"] == pytest.approx(results["valid"]["ndcg@10"], abs=5e-3)
    assert quant["ndcg_difference"] == pytest.approx(quant["int8"]["ndcg@10"] - quant["float"]["ndcg@10"])
    assert quant["int8_bytes"] < quant["float_bytes"]
    items, _ = _session(int8).run(None, {"history": np.zeros((2, 3), np.int64), "lengths": np.array([3, 1]),
                                         "exclude": np.full((2, 1), -1), "k": np.array(5)})
    assert items.shape == (2, 5)


def test_ncf_export_score_and_recommend_graphs_and_user_vocab_sidecar(checkpoints, exports):
    net, facts = load_net(checkpoints["neumf"])
    path = exports["neumf"]
    score_path, sidecar = path.with_name("neumf.score.onnx"), path.with_name("neumf.user_vocab.json")
    for p in (path, score_path):
        onnx.checker.check_model(onnx.load(p), full_check=True)
    assert _dims(onnx.load(path).graph.input) == {"user": ["batch"], "exclude": ["batch", "n_exclude"], "k": []}
    assert _dims(onnx.load(score_path).graph.input) == {"user": ["batch"], "item": ["batch"]}

    rng = np.random.default_rng(2)
    users, items = rng.integers(0, facts["n_users"], 9), rng.integers(0, facts["n_items"], 9)
    (scores,) = _session(score_path).run(None, {"user": users, "item": items})
    with torch.no_grad():
        np.testing.assert_allclose(scores, net(torch.from_numpy(users), torch.from_numpy(items)).numpy(),
                                   rtol=1e-5, atol=1e-5)
        full = net.score_all(torch.from_numpy(users))
    exclude = [sorted(set(rng.integers(0, facts["n_items"], 6).tolist())) for _ in users]
    padded = np.full((9, 6), -1)
    for row, ex in enumerate(exclude):
        padded[row, :len(ex)] = ex
    top, top_scores = _session(path).run(None, {"user": users, "exclude": padded, "k": np.array(12)})
    want, _ = torch_topk(full, exclude, 12)
    for row in range(9):
        assert not set(top[row].tolist()) & set(exclude[row])
        assert_same_topk(top[row].tolist(), want[row], full[row].numpy())

    # raw user ids stay out of the model file: a sidecar pinned by sha256, copied from the run
    meta = onnx_metadata(path)
    ref = json_meta(meta, "user_vocab")
    assert ref["file"] == sidecar.name and ref["sha256"] == sha256(sidecar) == facts["user_vocab_sha256"]
    assert sidecar.read_bytes() == (checkpoints["neumf"].parent / "user_vocab.json").read_bytes()
    user_ids = json.loads(sidecar.read_text())["user_vocab"]
    assert json.dumps(user_ids).encode() not in path.read_bytes()
    assert set(ref) == {"file", "sha256", "n_users", "format"}  # a reference, not the ids
    assert set(json_meta(meta, "companions")) == {"score"}


def test_exclusion_k_clamp_and_tie_rule(tmp_path):
    """All scores tied (zero MF): the lower index comes first; exclusions never appear; k clamps to 1..I."""
    net = MF(n_users=3, n_items=6, dim=4)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    vocab = tmp_path / "users.json"
    vocab.write_text(json.dumps({"user_vocab": ["a", "b", "c"]}))
    facts = {"model_class": "rectrain.models.ncf.MF", "model_config": net.config, "n_users": 3, "n_items": 6,
             "item_vocab": [f"i{i}" for i in range(6)]}
    export_model(net, facts, tmp_path / "mf.onnx", user_vocab=vocab)
    session = _session(tmp_path / "mf.onnx")

    def run(k, exclude):
        return session.run(None, {"user": np.array([0, 1]), "exclude": np.array(exclude).reshape(2, -1),
                                  "k": np.array(k)})

    items, scores = run(4, [[1, -1], [-1, 99]])  # -1 and out-of-range indices are padding
    assert items.tolist() == [[0, 2, 3, 4], [0, 1, 2, 3]]
    assert run(0, [[-1], [-1]])[0].shape == (2, 1) and run(-3, [[-1], [-1]])[0].shape == (2, 1)
    assert run(1000, [[-1], [-1]])[0].shape == (2, 6)
    items, scores = run(5, [[0, 1, 2, 3], [5, 5, 5, 5]])  # only two items left in row 0
    assert items.tolist() == [[4, 5, -1, -1, -1], [0, 1, 2, 3, 4]]
    assert np.isneginf(scores[0, 2:]).all() and np.isfinite(scores[1]).all()
    empty = session.run(None, {"user": np.array([2]), "exclude": np.zeros((1, 0), np.int64), "k": np.array(3)})
    assert empty[0].tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("make", [
    lambda: MF(5, 9, dim=4), lambda: GMF(5, 9, dim=4), lambda: MLP(5, 9, dim=4, layers=[8, 4]),
    lambda: NeuMF(5, 9, dim=4, layers=[8, 4]),
    lambda: TwoTower(n_items=9, n_categories=0, dim=4, cell="lstm", hidden=6, layers=2, normalize=True,
                     temperature=0.1, max_length=7),
    lambda: TwoTower(n_items=9, n_categories=0, dim=4, hidden=6, max_length=7, repeat_slots=2),
    lambda: TwoTower(n_items=9, n_categories=0, dim=4, hidden=6, max_length=7, repeat_slots=2, repeat_gate=True),
    lambda: TwoTower(n_items=9, n_categories=0, dim=4, hidden=6, max_length=7, repeat_slots=2, repeat_mode="mixture"),
    lambda: TwoTower(n_items=9, n_categories=2, dim=4, cell="transformer", hidden=6, layers=2, heads=2, max_length=7,
                     repeat_slots=2, repeat_gate=True),
    lambda: TwoTower(n_items=9, n_categories=0, dim=4, cell="transformer", hidden=6, layers=1, heads=1, max_length=7,
                     normalize=True, temperature=0.1),
    lambda: NeuMF(5, 9, dim=4, layers=[8, 4], sparse=True),
    lambda: TwoTower(n_items=9, n_categories=2, dim=4, hidden=6, max_length=7, sparse=True),
], ids=["mf", "gmf", "mlp", "neumf", "two_tower_lstm_normalized", "two_tower_repeat_bonus", "two_tower_repeat_gate",
        "two_tower_repeat_mixture", "two_tower_transformer_repeat_gate", "two_tower_transformer_normalized",
        "neumf_sparse_gradients", "two_tower_sparse_gradients"])
def test_every_model_class_exports_with_parity(tmp_path, make):
    torch.manual_seed(0)
    net = make().eval()
    if getattr(net, "repeat_bonus", None) is not None:
        with torch.no_grad():
            net.repeat_bonus.copy_(torch.tensor([2.0, -1.0]))  # large enough to reorder the top-K
            if net.repeat_gate is not None:
                net.repeat_gate.weight.normal_()
    facts = {"model_class": f"{type(net).__module__}.{type(net).__name__}", "model_config": net.config,
             "n_users": net.config.get("n_users", 0), "n_items": 9}
    vocab = tmp_path / "users.json"
    vocab.write_text(json.dumps({"user_vocab": [f"u{i}" for i in range(5)]}))
    report = export_model(net, facts, tmp_path / "m.onnx", user_vocab=vocab if "n_users" in net.config else None)
    for graph, parity in report.parity.items():
        assert parity["max_abs_diff"] <= 1e-5, graph
    assert report.files["recommend"].exists()
    for role, path in report.files.items():
        if path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(path), full_check=True)


@pytest.mark.parametrize("categories", [0, 3])
def test_the_recommend_graph_holds_the_catalog_once(tmp_path, categories):
    """The history embedding and the scored table are one initializer when they are one tensor (tied,
    no item features, no normalisation): not a constant-folded transposed second copy of the catalog
    (which doubled the file and hit protobuf's 2 GB at ~4M items). With item features the scored
    vectors differ from the id table, and two tables are what the graph needs."""
    torch.manual_seed(0)
    net = TwoTower(n_items=300, n_categories=categories, dim=8, hidden=6, max_length=5).eval()
    if categories:
        net.set_item_features(torch.eye(categories)[torch.arange(300) % categories])
    facts = {"model_class": "rectrain.models.two_tower.TwoTower", "model_config": net.config, "n_items": 300}
    report = export_model(net, facts, tmp_path / "tt.onnx", ann=None)
    tables = [list(t.dims) for t in onnx.load(report.files["recommend"]).graph.initializer if 300 in t.dims]
    assert tables == [[300, 8]] * (1 if not categories else 2), tables
    assert report.parity["recommend"]["max_abs_diff"] <= 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter says it is legacy
def test_frozen_axes_are_detected(tmp_path):
    net = MF(4, 6, dim=3).eval()
    spec = graph_specs(net)[1]  # score graph
    path = tmp_path / "frozen.onnx"
    torch.onnx.export(spec.module, spec.example, path, dynamo=False, opset_version=17,
                      input_names=["user", "item"], output_names=["scores"])  # no dynamic_axes: frozen to 3
    with pytest.raises(ExportError, match="frozen"):
        check_symbolic(onnx.load(path), spec)


def test_parity_failure_writes_nothing_and_keeps_the_old_file(checkpoints, tmp_path, monkeypatch):
    from rectrain.export import wrappers

    output = tmp_path / "model.onnx"
    export_checkpoint(checkpoints["two_tower"], output)
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    original = wrappers.exclude_and_topk
    monkeypatch.setattr(wrappers, "exclude_and_topk", lambda s, e, k: original(s + 1e-3, e, k))
    with pytest.raises(ExportError, match="does not match PyTorch"):
        export_checkpoint(checkpoints["two_tower"], output)
    assert {p.name: sha256(p) for p in tmp_path.iterdir()} == before  # no temp file, old files intact
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportError):
        export_checkpoint(checkpoints["two_tower"], fresh / "model.onnx")
    assert not fresh.exists() or not any(fresh.iterdir())


def test_ncf_export_refuses_a_foreign_user_vocabulary(checkpoints, tmp_path):
    wrong = tmp_path / "user_vocab.json"
    wrong.write_text(json.dumps({"user_vocab": ["x"]}))
    with pytest.raises(ExportError, match="does not match"):
        export_checkpoint(checkpoints["neumf"], tmp_path / "m.onnx", user_vocab=wrong)
    assert not (tmp_path / "m.onnx").exists()


def _export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_cli(checkpoints, tmp_path, capsys):
    cli = _export_cli()
    assert cli.main([f"ckpt_path={checkpoints['neumf']}", f"output={tmp_path / 'cli.onnx'}"]) == 0
    out = capsys.readouterr().out
    assert "exported ncf model (opset 17)" in out and "parity recommend" in out
    assert {p.name for p in tmp_path.iterdir()} == {"cli.onnx", "cli.score.onnx", "cli.user_vocab.json"}
    assert cli.main(["ckpt_path"]) == 2
    assert cli.main([f"ckpt_path={checkpoints['neumf']}", "nope=1"]) == 2
    assert cli.main([f"ckpt_path={tmp_path / 'missing.ckpt'}"]) == 2
    assert cli.main([f"ckpt_path={checkpoints['neumf']}", "quantize=maybe"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nope'" in err and "checkpoint not found" in err and "expected true or false" in err


def test_export_cli_quantize_prints_the_ndcg_difference(checkpoints, tmp_path, capsys):
    cli = _export_cli()
    assert cli.main([f"ckpt_path={checkpoints['neumf']}", f"output={tmp_path / 'q.onnx'}", "quantize=true"]) == 0
    out = capsys.readouterr().out
    assert "int8: validation ndcg@10" in out and "difference" in out
    assert (tmp_path / "q.int8.onnx").exists()


def test_validation_queries_rebuild_the_training_data(checkpoints):
    _, facts = load_net(checkpoints["neumf"])
    queries = validation_queries(checkpoints["neumf"])
    assert len(queries) == facts["n_users"] and queries.n_items == facts["n_items"]


def test_transformer_query_tower_trains_exports_and_serves(tmp_path):
    """cell=transformer end to end: train, export (parity-checked), and the torch-free scorer answers what
    the trained net ranks."""
    from rectrain.serving import Scorer
    from rectrain.training import train
    from tests.test_export_fixtures import DATA, LEAN, _compose

    results = train(_compose([*DATA, "model=two_tower", "model.dim=16", "model.net.cell=transformer",
                              "model.net.hidden=32", "model.net.layers=2", "model.net.heads=2",
                              "model.net.max_length=20", "model.net.repeat_slots=2", "data.batch_size=64", *LEAN,
                              f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]))
    path = tmp_path / "tf.onnx"
    export_checkpoint(Path(results["best_checkpoint"]), path)
    net, _ = load_net(Path(results["best_checkpoint"]))
    assert net.config["cell"] == "transformer" and len(net.query_tower.blocks) == 2
    scorer = Scorer.load(path, max_k=50)
    vocab = scorer.model.item_vocab
    history = [4, 9, 4, 17, 2]
    answer = scorer.recommend(history=[vocab[i] for i in history], k=5, exclude_seen=False)
    with torch.no_grad():
        scores = net.eval()(torch.tensor([history]), torch.tensor([len(history)]))[0]
    top = torch.topk(scores, 5)
    assert answer["items"] == [vocab[int(i)] for i in top.indices]
    np.testing.assert_allclose(answer["scores"], top.values.numpy(), rtol=1e-4, atol=1e-4)
