"""User-level differential privacy: records hold one user each, per-user gradients are exact, the
accountant's bookkeeping reaches the target epsilon, the guarantee travels to results, checkpoint
and ONNX metadata, and bad settings are one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from rectrain.data.batching import NegativeSampler, PointwiseSpec, SequenceBatches, SequenceSpec, sequence_windows
from rectrain.data.records import PointwiseUserRecords, SequenceUserRecords, UserRecordSpec
from rectrain.errors import ConfigError
from rectrain.models.ncf import MF
from rectrain.models.two_tower import TwoTower
from rectrain.privacy import DPSettings, UserLevelDP, calibrate_noise, make_dp_compatible, per_user_gradients
from tests.conftest import ROOT, TINY_DATA

DP_RUN = [*TINY_DATA, "logger=none", "callbacks.item_embeddings=null", "callbacks.lr_monitor=null",
          "trainer.max_epochs=2", "privacy=dp", "privacy.users_per_step=32"]


def _toy_log() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(6), [3, 9, 1, 5, 12, 2])
    # user u consumes items u*10 .. u*10+9 only, so an item says whose record it came from
    items = users * 10 + rng.integers(0, 10, size=users.size)
    return users, items


def test_pointwise_records_hold_one_users_events_and_poisson_sample():
    users, items = _toy_log()
    spec = UserRecordSpec(PointwiseSpec(n_negatives=2, exclude_positives=False), sample_rate=0.5, events_per_user=4)
    batches = PointwiseUserRecords(users, items, spec, NegativeSampler(60), seed=3)
    assert len(batches) == 2  # an epoch is 1 / sample_rate steps
    seen = []
    for epoch in range(30):
        batches.set_epoch(epoch)
        for batch in batches:
            b = batch["user"].numel()
            assert batch["item"].shape == batch["label"].shape == batch["weight"].shape and batch["item"].shape[0] == b
            width = batch["item"].shape[1] // 3  # positives first, then 2 negatives each
            for row in range(b):
                user = int(batch["user"][row])
                pos = batch["item"][row, :width][batch["weight"][row, :width] > 0]
                assert 1 <= pos.numel() <= min(4, int((users == user).sum()))
                assert set((pos // 10).tolist()) == {user}  # the row holds this user's positives only
                assert (batch["label"][row, :width] == 1).all() and (batch["label"][row, width:] == 0).all()
            seen.append(b)
    assert abs(np.mean(seen) - 3.0) < 0.6  # 6 users x 0.5 on average, varying per step
    assert min(seen) < max(seen)


def test_sequence_records_hold_one_users_windows():
    users, items = _toy_log()
    windows, lengths, first, owner = sequence_windows(users, items, max_length=3)
    flat = SequenceBatches(windows, lengths, batch_size=4, first_target=first)
    spec = UserRecordSpec(SequenceSpec(max_length=3), sample_rate=1.0, windows_per_user=2)
    batch = next(iter(SequenceUserRecords(flat.inputs, flat.lengths, flat.targets, owner, spec)))
    assert batch["users"].tolist() == sorted(set(owner.tolist()))  # rate 1: everyone, once
    assert batch["items"].shape[:2] == batch["targets"].shape[:2] == batch["lengths"].shape
    for row, user in enumerate(batch["users"].tolist()):
        n_windows = int((owner == user).sum())
        has_target = (batch["targets"][row] >= 0).any(dim=1)
        assert int(has_target.sum()) == min(2, n_windows)
        real = batch["targets"][row][batch["targets"][row] >= 0]
        assert set((real // 10).tolist()) == {user}


def _one_user_gradient(net, loss_fn, record):
    net.zero_grad()
    loss_fn({k: v for k, v in record.items()}).backward()
    return {f"net.{n}": p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("cell", ["gru", "transformer"])
def test_per_user_gradients_equal_each_users_own_backward(cell):
    torch.manual_seed(0)
    net = make_dp_compatible(TwoTower(30, 4, dim=8, hidden=8, cell=cell, embedding_dropout=0.0, dropout=0.0,
                                      max_length=6, repeat_slots=2))
    net.set_item_features(torch.rand(30, 4).round())
    if cell == "gru":
        assert type(net.query_tower.rnn).__name__ == "DPGRU"
    import torch.nn.functional as F

    def loss_fn(record):  # a user's windows, full softmax, as TwoTowerTask.record_loss
        items, targets = record["items"], record["targets"]
        k, length = items.shape
        q = net.query_all_positions(items).reshape(k * length, -1)
        rows = torch.arange(k).repeat_interleave(length)
        back = torch.arange(length).repeat(k).view(-1, 1) - torch.arange(length).view(1, -1)
        logits = net.history_scores(q, net.item_vectors(), items[rows], back)
        weight = (targets.reshape(-1) >= 0).float()
        return (F.cross_entropy(logits, targets.reshape(-1).clamp(min=0), reduction="none") * weight).sum() / weight.sum()

    batch = {"items": torch.randint(0, 30, (3, 2, 6)), "targets": torch.randint(-1, 30, (3, 2, 6))}
    batch["targets"][:, :, 0] = 5  # every window has a target
    grads, losses = per_user_gradients(net, loss_fn, batch)
    # the tied item embedding, the item tower's MLP, the RNN cells and the repeat bonus all get a gradient
    assert set(grads) == {f"net.{n}" for n, _ in net.named_parameters()}
    for row in range(3):
        expected = _one_user_gradient(net, loss_fn, {k: v[row] for k, v in batch.items()})
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name][row], grad, atol=1e-6, rtol=1e-5)
    # the functional call leaves the model's own parameters in place (it still trains and exports)
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())


def test_per_user_gradients_of_mf_touch_only_the_users_own_row():
    net = MF(5, 7, dim=3)

    def loss_fn(record):
        return -torch.nn.functional.logsigmoid(net(record["user"].expand(2), record["item"])).mean()

    batch = {"user": torch.tensor([1, 3]), "item": torch.tensor([[0, 2], [4, 4]])}
    grads, _ = per_user_gradients(net, loss_fn, batch)
    user_grad = grads["net.user.weight"]  # (2 users, 5 rows, 3)
    assert user_grad[0, 1].abs().sum() > 0 and user_grad[0][[0, 2, 3, 4]].abs().sum() == 0
    assert user_grad[1, 3].abs().sum() > 0 and user_grad[1][[0, 1, 2, 4]].abs().sum() == 0


def test_accountant_spends_the_target_epsilon_by_the_last_planned_step():
    settings = DPSettings(epsilon=2.0, users_per_step=50)
    privacy = UserLevelDP(settings, n_users=1000, epochs=3)
    plan = privacy.plan
    assert plan["delta"] == pytest.approx(1e-3)  # default: 1 / users
    assert plan["sample_rate"] == pytest.approx(0.05) and plan["steps_per_epoch"] == 20 and plan["planned_steps"] == 60
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = privacy.wrap_optimizer(torch.optim.SGD([param], lr=0.1))
    spent = []
    for step in range(1, plan["planned_steps"] + 1):
        optimizer.zero_grad()
        param.grad_sample = torch.ones(3, 4)
        optimizer.step()
        if step in (1, 30, 60):
            spent.append(privacy.epsilon_spent())
    assert spent == sorted(spent)  # every step spends budget
    assert spent[-1] == pytest.approx(2.0, abs=0.01)
    report = privacy.report()
    assert report["steps"] == 60 and report["accountant"] == "rdp" and report["unit"].startswith("user")
    # a checkpoint's accountant state restores the spent budget
    again = UserLevelDP(settings, n_users=1000, epochs=3)
    again.load_state(json.loads(json.dumps(privacy.state())))
    assert again.epsilon_spent() == pytest.approx(spent[-1])


def test_unreachable_epsilon_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon.*cannot be reached"):
        calibrate_noise(DPSettings(epsilon=0.01, users_per_step=500), n_users=600, epochs=50)
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        DPSettings(epsilon=0)
    with pytest.raises(ConfigError, match=r"privacy\.accountant"):
        DPSettings(accountant="moments")
    with pytest.raises(ConfigError, match="BatchNorm"):
        make_dp_compatible(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))


@pytest.mark.parametrize("model", ["mf", "two_tower"])
def test_dp_run_records_the_guarantee_everywhere(compose_cfg, tmp_path, model):
    from rectrain.runs import load_checkpoint
    from rectrain.export import export_checkpoint
    from rectrain.export.metadata import read
    from rectrain.training import train

    tensorboard = ["logger=tensorboard"] if model == "mf" else []
    results = train(compose_cfg(*DP_RUN, f"model={model}", *tensorboard))
    privacy = results["privacy"]
    assert privacy["target_epsilon"] == 8.0 and 0 < privacy["epsilon"] <= 8.0 + 0.01
    assert privacy["steps"] == privacy["planned_steps"]  # the planned epochs ran: the target was spent
    assert privacy["epsilon"] == pytest.approx(8.0, abs=0.01)
    assert results["best_checkpoint"].endswith("last.ckpt")  # DP: the last model, not one chosen on validation
    assert results["test"]["ndcg@10"] >= 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["privacy"]["epsilon"] == privacy["epsilon"]
    facts = load_checkpoint(results["best_checkpoint"])["rectrain"]
    assert facts["privacy"]["epsilon"] == privacy["epsilon"] and facts["privacy_state"]["history"]
    if tensorboard:  # the spent epsilon per epoch and, in the hparams tab, the guarantee reached
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for event_file in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(event_file))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert {"privacy/epsilon", "hparam/privacy_epsilon"} <= tags
    if model == "two_tower":  # DPGRU trained, a plain GRU exported (same state-dict names)
        import onnx

        export_checkpoint(results["best_checkpoint"], tmp_path / "m.onnx")
        meta = read(onnx.load(str(tmp_path / "m.onnx")))
        assert json.loads(meta["privacy"])["epsilon"] == privacy["epsilon"]


def test_non_dp_run_says_so(compose_cfg):
    from rectrain.training import train

    results = train(compose_cfg(*DP_RUN[:-2], "model=mf", "trainer.max_epochs=1"))
    assert results["privacy"] == {"mechanism": "none", "differential_privacy": False}


@pytest.mark.parametrize("override, key", [
    (["model=two_tower", "model.loss=sampled"], "model.loss"),
    (["model=mf", "model.negatives.alpha=0.75"], "model.negatives.alpha"),
    (["model=mf", "trainer=ddp"], "trainer.strategy"),
    (["model=mf", "privacy.epsilon=0.001", "trainer.max_epochs=20"], "privacy.epsilon"),
])
def test_settings_dp_cannot_honour_are_config_errors(compose_cfg, override, key):
    from rectrain.training import build, build_net_and_task, enable_privacy

    cfg = compose_cfg(*DP_RUN, *override)
    datamodule = build(cfg.data)
    datamodule.setup()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        enable_privacy(cfg, datamodule, build_net_and_task(cfg, datamodule))


def test_train_py_exits_2_with_one_line_for_an_unreachable_epsilon(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=mf", *TINY_DATA, "privacy=dp", "privacy.epsilon=0.001",
         f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "privacy.epsilon" in errors[0] and "cannot be reached" in errors[0]
    assert "Traceback" not in proc.stderr
