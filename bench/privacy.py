"""What user-level differential privacy costs on ml-100k, and whether it protects: MF and the
two-tower GRU at epsilon 1, 4, 8 and without DP, beside popularity and item-kNN.

Accuracy: every model is trained from its experiment file (no DP: ``ml100k_mf`` / ``ml100k_two_tower``;
DP: ``ml100k_mf_dp`` / ``ml100k_two_tower_dp`` with ``privacy.epsilon``) for every seed, and tested by
full ranking (leave-one-out, seen items masked). Without DP the best epoch by validation NDCG@10 is
tested (early stopping); with DP the last epoch (the one the budget covers). Train seconds per
epoch from the trainer's own epochs (validation excluded).

Membership inference (Yeom et al. 2018's loss threshold): the same experiments trained on a seeded
half of the users only (``data.train_user_fraction=0.5``: the other half stay in the vocabulary and
evaluation, their events never trained on). The attack scores each user by the model's mean loss
on that user's training-split events (MF: -log sigmoid of each consumed item's score; two-tower:
next-item cross-entropy over the user's history windows) and guesses "member" below a threshold.
AUC over all thresholds: training users' held-in events against held-out users' events, per user
(the unit DP protects) and per event. 0.5 = the model says nothing about who was trained on.

    python bench/privacy.py [--seeds 0,1,2] [--attack-seeds 0] [--epsilons 1,4,8] [--models mf,two_tower]
        [--data ../shared/data/ml-100k] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    LEAN_OVERRIDES,
    TrainEpochTimer,
    compose_train_config,
    mean_std,
    ready_datamodule,
    start_seeded_bench,
    trained_net,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rectrain.data.batching import SequenceBatches, sequence_windows  # noqa: E402
from rectrain.evaluation.baselines import ItemKNN, MostPopular  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking  # noqa: E402
from rectrain.training import train  # noqa: E402

NAMES = {"mf": "MF", "two_tower": "two-tower GRU"}


def experiment(model: str, epsilon: float | None) -> list[str]:
    if epsilon is None:
        return [f"experiment=ml100k_{model}"]
    return [f"experiment=ml100k_{model}_dp", f"privacy.epsilon={epsilon}"]


def run_one(model: str, epsilon: float | None, seed: int, args: argparse.Namespace, tmp: Path,
            members: float = 1.0) -> dict:
    """Train one run; test metrics, privacy report, per-epoch seconds (and the cfg/results for the attack)."""
    label = f"{model}-eps{epsilon}-seed{seed}-m{members}"
    overrides = [*LEAN_OVERRIDES, *experiment(model, epsilon), f"data.source.root={args.data}",
                 f"paths.cache_dir={tmp / 'cache'}", f"seed={seed}", f"torch_threads={args.threads}",
                 "+callbacks.epoch_timer._target_=common.TrainEpochTimer"]
    if members < 1.0:
        overrides.append(f"+data.train_user_fraction={members}")
    cfg = compose_train_config(overrides, tmp / label)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(cfg)
    timer = TrainEpochTimer.runs[-1]
    return {"cfg": cfg, "results": results, "test": results["test"], "privacy": results["privacy"],
            "seconds": time.perf_counter() - start, "epochs": results["epochs_trained"],
            "epoch_s": statistics.median(timer.train_seconds) if timer.train_seconds else float("nan")}


def baselines(args: argparse.Namespace, tmp: Path) -> dict:
    cfg = compose_train_config([*LEAN_OVERRIDES, "experiment=ml100k_mf", f"data.source.root={args.data}",
                                f"paths.cache_dir={tmp / 'cache'}"], tmp / "baselines")
    data = ready_datamodule(cfg).data
    hist, queries = data.history("test"), data.ranking_queries("test")
    rows = {}
    for name, model in (("most popular", MostPopular()), ("item-kNN (cosine, full)", ItemKNN())):
        model.fit(hist.user, hist.item, data.n_users, data.n_items)
        rows[name] = evaluate_ranking(model, queries, ks=(10,), item_popularity=data.item_popularity("test")).summary()
    print(f"ml-100k: {data.n_users} users, {data.n_items} items, {len(data.train)} train / {len(data.valid)} valid"
          f" / {len(data.test)} test events; {queries.protocol}\n")
    return rows


@torch.no_grad()
def event_losses(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(user of each training-split event, the trained model's loss on it), members and non-members alike."""
    from rectrain.runs import NCF, model_kind

    net, data = trained_net(run["results"])
    net.eval()
    users, items = data.train.user, data.train.item
    if model_kind(net) == NCF:  # -log sigmoid(score) of each consumed item
        scores = torch.cat([net(torch.as_tensor(users[i:i + 65536]), torch.as_tensor(items[i:i + 65536]))
                            for i in range(0, len(users), 65536)])
        return users, F.softplus(-scores).numpy()
    windows, lengths, first, owner = sequence_windows(users, items, net.max_length)
    flat = SequenceBatches(windows, lengths, batch_size=256, first_target=first)
    out_users, out_losses = [], []
    for start in range(0, flat.lengths.numel(), 256):
        rows = slice(start, start + 256)
        x, t = flat.inputs[rows], flat.targets[rows]
        logits = net.score(net.query_all_positions(x), net.item_vectors())  # (B, L, I)
        loss = F.cross_entropy(logits.transpose(1, 2), t.clamp(min=0), reduction="none")  # (B, L)
        valid = t >= 0
        out_losses.append(loss[valid].numpy())
        out_users.append(np.repeat(owner[rows], valid.sum(1).numpy()))
    return np.concatenate(out_users), np.concatenate(out_losses)


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's loss < a non-member's loss), ties counting half (Mann-Whitney; the attack's ROC AUC)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([-members, -others]))  # higher score = lower loss = "member"
    n_m, n_o = len(members), len(others)
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2) / (n_m * n_o))


def attack(run: dict) -> dict:
    datamodule = ready_datamodule(run["cfg"])
    members = set(datamodule.member_users().tolist())
    users, losses = event_losses(run)
    is_member = np.fromiter((u in members for u in users), bool, len(users))
    per_user = {u: losses[users == u].mean() for u in np.unique(users)}
    user_loss = np.array(list(per_user.values()))
    user_member = np.array([u in members for u in per_user])
    return {"user_auc": auc(user_loss[user_member], user_loss[~user_member]),
            "event_auc": auc(losses[is_member], losses[~is_member]),
            "members": int(user_member.sum()), "held_out": int((~user_member).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attack-seeds", default="0", help="seeds of the half-the-users runs (empty: no attack)")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--models", default="mf,two_tower")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    seeds = start_seeded_bench(args, "u.data", "ml-100k")
    attack_seeds = [int(s) for s in args.attack_seeds.split(",") if s.strip()]
    settings: list[float | None] = [None, *sorted((float(e) for e in args.epsilons.split(",") if e.strip()),
                                                  reverse=True)]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = baselines(args, tmp)
        runs, attacks = {}, {}
        for model in models:
            for eps in settings:
                runs[model, eps] = [run_one(model, eps, s, args, tmp) for s in seeds]
                print(f"  ({time.perf_counter() - started:.0f} s) {model} eps={eps}: test NDCG@10 "
                      + ", ".join(f"{r['test']['ndcg@10']:.4f}" for r in runs[model, eps]), file=sys.stderr)
                attacks[model, eps] = [attack(run_one(model, eps, s, args, tmp, members=0.5)) for s in attack_seeds]

    print(f"Test, full ranking (leave-one-out, seen items masked), mean ± sd over seeds {seeds}; "
          f"torch.set_num_threads({args.threads}), CPU, niced, machine shared with other jobs\n")
    print("| method | privacy | HR@10 | NDCG@10 | epsilon spent (delta) | noise multiplier | epochs | "
          "train s/epoch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, row in base.items():
        print(f"| {name} | none | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | - | - | - | - |")
    for (model, eps), rs in runs.items():
        p = rs[0]["privacy"]
        guarantee = "none" if eps is None else f"user-level DP, epsilon {eps:g}"
        spent = "-" if eps is None else f"{statistics.mean(r['privacy']['epsilon'] for r in rs):.2f} ({p['delta']:.2g})"
        sigma = "-" if eps is None else f"{p['noise_multiplier']:.3f}"
        epochs = ", ".join(str(r["epochs"]) for r in rs)
        print(f"| {NAMES[model]} ({' '.join(experiment(model, eps))}) | {guarantee} | "
              f"{mean_std([r['test']['hr@10'] for r in rs])} | {mean_std([r['test']['ndcg@10'] for r in rs])} | "
              f"{spent} | {sigma} | {epochs} | {statistics.mean(r['epoch_s'] for r in rs):.2f} |")

    if attack_seeds:
        print(f"\nMembership inference, loss threshold, trained on half the users (seeds {attack_seeds}): "
              "ROC AUC of training users' held-in events against held-out users' events (0.5 = no signal)\n")
        print("| model | privacy | AUC per user | AUC per event | members / held-out users |")
        print("|---|---|---:|---:|---:|")
        for (model, eps), rs in attacks.items():
            guarantee = "none" if eps is None else f"epsilon {eps:g}"
            print(f"| {NAMES[model]} | {guarantee} | {mean_std([r['user_auc'] for r in rs], 3)} | "
                  f"{mean_std([r['event_auc'] for r in rs], 3)} | {rs[0]['members']} / {rs[0]['held_out']} |")
    print(f"\nbench wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
