"""End-to-end runs of the real config, shrunk: results file, checkpoints, resume, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rectrain.runs import load_checkpoint, rebuild_model
from rectrain.training import train
from tests.conftest import TINY_DATA


def test_default_config_trains_and_writes_results(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY_DATA, "trainer.max_epochs=2")
    results = train(cfg)
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "results.json").read_text())
    assert saved["valid"] == pytest.approx(results["valid"])
    for split in ("valid", "test"):
        for key in ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "gini@10"):
            assert 0.0 <= saved[split][key] <= 1.0
        assert saved[split]["ndcg@10"] <= saved[split]["hr@10"]
    assert saved["model"] == "NeuMF" and "leave-one-out" in saved["protocol"]

    # the checkpoint loads with weights_only and rebuilds the net without any config
    ckpt = load_checkpoint(saved["best_checkpoint"])
    facts = ckpt["rectrain"]
    assert facts["model_class"] == "rectrain.models.ncf.NeuMF"
    assert len(facts["item_vocab"]) == facts["n_items"]
    assert "user_vocab" not in facts  # raw user ids stay out of model files
    sidecar = Path(saved["best_checkpoint"]).parent / "user_vocab.json"
    import hashlib

    assert hashlib.sha256(sidecar.read_bytes()).hexdigest() == facts["user_vocab_sha256"]
    net = rebuild_model(ckpt)
    assert net.score_all(torch.tensor([0, 1])).shape == (2, facts["n_items"])

    # TensorBoard: scalars, the hparams tab with final metrics, and the projector
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = run / "tensorboard"
    tags = set()
    for event_file in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss_epoch", "val/ndcg@10", "val/hr@10", "val/mrr@10"} <= tags
    assert {"hparam/val/ndcg@10", "hparam/test/ndcg@10"} <= tags
    assert (tb_dir / "projector_config.pbtxt").exists()
    metadata = next(tb_dir.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "title\tcategories\tpopularity" and "cat" in metadata[1]


@pytest.mark.parametrize("model", ["mf", "gmf", "mlp", "neumf"])
def test_every_model_config_instantiates(compose_cfg, model):
    from rectrain.training import build_net_and_task

    cfg = compose_cfg(f"model={model}", *TINY_DATA)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    task = build_net_and_task(cfg, dm)
    assert type(task.net).__name__ == {"mf": "MF", "gmf": "GMF", "mlp": "MLP", "neumf": "NeuMF"}[model]
    cfg64 = compose_cfg(f"model={model}", "model.dim=16", *TINY_DATA)
    assert build_net_and_task(cfg64, dm).net.item_embeddings().shape[1] in (16, 32)


def test_bpr_and_popularity_negatives_train(compose_cfg):
    cfg = compose_cfg("model=mf", *TINY_DATA, "trainer.max_epochs=1", "model.loss=bpr", "model.negatives.alpha=0.75",
                      "logger=none", "test=false")
    results = train(cfg)
    assert results["valid"]["hr@10"] > 0


def test_resume_reaches_the_same_metrics(compose_cfg, tmp_path):
    common = ["model=mlp", *TINY_DATA, "logger=none", "callbacks.item_embeddings=null"]
    full = train(compose_cfg(*common, "trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'full'}"))
    # an interrupted run: stopped after the first epoch ...
    train(compose_cfg(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'part'}", "test=false"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert last.exists()
    # ... and resumed from its last checkpoint
    resumed = train(compose_cfg(*common, "trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'part'}",
                                f"ckpt_path={last}"))
    assert resumed["epochs_trained"] == full["epochs_trained"] == 2
    assert resumed["valid"] == pytest.approx(full["valid"], abs=1e-6)
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-6)


def test_nan_loss_stops_with_a_clear_message(compose_cfg):
    cfg = compose_cfg("model=mf", *TINY_DATA, "trainer.max_epochs=1", "logger=none", "model.optimizer.lr=1e30",
                      "model.loss=bpr")
    with pytest.raises(FloatingPointError, match="training loss is"):
        train(cfg)


def test_neumf_starts_from_trained_gmf_and_mlp(compose_cfg, tmp_path):
    common = [*TINY_DATA, "trainer.max_epochs=1", "logger=none", "test=false", "model.dim=8"]
    gmf = train(compose_cfg("model=gmf", *common, f"paths.output_dir={tmp_path / 'gmf'}"))
    mlp = train(compose_cfg("model=mlp", *common, "model.net.layers=[16,8]", f"paths.output_dir={tmp_path / 'mlp'}"))
    from rectrain.training import build, build_net_and_task

    cfg = compose_cfg("model=neumf", *common, "model.net.layers=[16,8]",
                      f"model.pretrained.gmf={gmf['best_checkpoint']}", f"model.pretrained.mlp={mlp['best_checkpoint']}")
    dm = build(cfg.data)
    dm.setup()
    neumf = build_net_and_task(cfg, dm).net
    gmf_net = rebuild_model(load_checkpoint(gmf["best_checkpoint"]))
    mlp_net = rebuild_model(load_checkpoint(mlp["best_checkpoint"]))
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(neumf(users, items), 0.5 * gmf_net(users, items) + 0.5 * mlp_net(users, items))
