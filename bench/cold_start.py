"""Cold-start items: does the item tower rank items it never saw in training above random?

Synthetic data (``data=synthetic``: power-law popularity, taste groups, item categories) with
``data.split.cold_item_fraction`` of the items (default 10%) held out of training entirely: their
training events are dropped, so neither tower ever trains on them as targets; the item tower's
category MLP is all that places them (``model.net.id_dropout`` > 0 teaches that MLP to stand alone).
The two-tower model is trained through ``rectrain.training.train`` (leave-one-out, early stopping on
validation NDCG@10); its best checkpoint then ranks the full catalog (seen items masked) for the
test queries whose target is a cold item. Compared with:

* **random ranker**: its expected HR@K is K / (number of unmasked candidates), averaged over the queries;
* **popularity** (training counts): a never-seen item has count 0, so it cannot rank it;
* **id-only ablation** (``--ablation``): the same settings with the item tower's category MLP removed
  (no side features: the cold items keep their random initial id vectors).

    python bench/cold_start.py [--seeds 0] [--fraction 0.1] [--ks 10,50] [--ablation] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LEAN_OVERRIDES, compose_train_config, mean_std, quiet_lightning, trained_net  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rectrain.training as training  # noqa: E402
from rectrain.evaluation.baselines import MostPopular  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking  # noqa: E402
from rectrain.tasks.two_tower import padded_histories  # noqa: E402

#: the model settings of this measurement (the synthetic data is small: a small, regularised tower)
MODEL_OVERRIDES = (
    "model=two_tower",
    # in-batch sampled softmax: a full softmax over the catalog pushes every never-positive (cold) item
    # down at every step, which teaches the towers to rank cold items *last* (measured: HR@50 = 0)
    "model.loss=sampled",
    "model.net.id_dropout=0.3",
    "trainer.max_epochs=12",
    "callbacks.early_stopping.patience=2",
)


def model_score_fn(net: torch.nn.Module):
    net.eval()

    @torch.no_grad()
    def score(queries, rows):
        items, lengths = padded_histories(queries, rows, net.max_length)
        return net(items, lengths)
    return score


@contextlib.contextmanager
def id_only_items():
    """Build the net as if the data had no item categories (the id-only ablation)."""
    original = training.build_net_and_task

    def build_without_categories(cfg, datamodule):
        data = datamodule.data
        saved = data.category_vocab, data.item_category_indptr, data.item_category_index
        data.category_vocab = np.zeros(0, dtype=str)
        data.item_category_indptr = np.zeros(data.n_items + 1, dtype=np.int64)
        data.item_category_index = np.zeros(0, dtype=np.int64)
        try:
            return original(cfg, datamodule)
        finally:
            data.category_vocab, data.item_category_indptr, data.item_category_index = saved

    training.build_net_and_task = build_without_categories
    try:
        yield
    finally:
        training.build_net_and_task = original


def run_one(seed: int, args: argparse.Namespace, tmp: Path, id_only: bool) -> dict:
    overrides = [*LEAN_OVERRIDES, *MODEL_OVERRIDES, f"++data.split.cold_item_fraction={args.fraction}",
                 f"paths.cache_dir={tmp / 'cache'}", f"seed={seed}", f"torch_threads={args.threads}", *args.set]
    cfg = compose_train_config(overrides, tmp / f"seed{seed}-{'id' if id_only else 'full'}")
    with contextlib.redirect_stdout(io.StringIO()), (id_only_items() if id_only else contextlib.nullcontext()):
        results = training.train(cfg)
    net, data = trained_net(results)
    queries = data.ranking_queries("test")
    cold = np.isin(queries.target_items, data.cold_items)  # one target per query (leave-one-out)
    cold_q, warm_q = queries.subset(np.flatnonzero(cold)), queries.subset(np.flatnonzero(~cold))
    n_excluded = np.diff(cold_q.exclude_indptr)
    random_hr = {f"hr@{k}": float(np.mean(np.minimum(k / (data.n_items - n_excluded), 1.0))) for k in args.ks}
    popularity = MostPopular(distinct_users=False).fit(data.train.user, data.train.item, data.n_users, data.n_items)
    out = {
        "model_cold": evaluate_ranking(model_score_fn(net), cold_q, ks=args.ks).summary(),
        "model_warm": evaluate_ranking(model_score_fn(net), warm_q, ks=args.ks).summary(),
        "pop_cold": evaluate_ranking(popularity, cold_q, ks=args.ks).summary(),
        "random_cold": random_hr,
        "n_cold_queries": int(cold.sum()), "n_queries": len(queries), "n_items": data.n_items,
        "n_cold_items": int(data.cold_items.size), "n_categories": data.n_categories,
        "dropped": data.stats.get("cold_item_train_events_dropped", 0),
        "epochs": results["epochs_trained"], "test_all": results["test"],
        "train_has_cold": bool(np.isin(data.train.item, data.cold_items).any()),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of items held out of training")
    parser.add_argument("--ks", default="10,50")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ablation", action="store_true", help="also train the id-only item tower")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.ks = tuple(int(k) for k in args.ks.split(","))
    torch.set_num_threads(args.threads)
    quiet_lightning()
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        full = [run_one(s, args, tmp, id_only=False) for s in seeds]
        ablation = [run_one(s, args, tmp, id_only=True) for s in seeds] if args.ablation else []

    f0 = full[0]
    assert not any(r["train_has_cold"] for r in full + ablation), "a cold item leaked into training"
    print(f"synthetic data (conf/data/synthetic.yaml): {f0['n_items']} items, {f0['n_categories']} categories; "
          f"{f0['n_cold_items']} cold items ({args.fraction:.0%}) held out of training ({f0['dropped']} training "
          f"events dropped, none left); {f0['n_cold_queries']} of {f0['n_queries']} test queries have a cold target."
          f"\nFull ranking of all {f0['n_items']} items, leave-one-out, seen items masked; settings: "
          f"{' '.join(MODEL_OVERRIDES[1:] + tuple(args.set))}; mean ± sd over seeds {seeds}\n")
    cols = [f"HR@{k}" for k in args.ks]
    print(f"| ranker | queries | {' | '.join(cols)} | NDCG@{args.ks[0]} |")
    print("|---|---|" + "---:|" * (len(cols) + 1))

    def row(name: str, what: str, runs: list[dict], key: str) -> None:
        cells = [mean_std([r[key][f"hr@{k}"] for r in runs]) for k in args.ks]
        nd = mean_std([r[key][f"ndcg@{args.ks[0]}"] for r in runs]) if f"ndcg@{args.ks[0]}" in runs[0][key] else "-"
        print(f"| {name} | {what} | {' | '.join(cells)} | {nd} |")

    row("two-tower (id + category MLP)", "cold targets", full, "model_cold")
    if ablation:
        row("two-tower, id only (ablation)", "cold targets", ablation, "model_cold")
    row("random ranker (expected)", "cold targets", full, "random_cold")
    row("popularity (training counts)", "cold targets", full, "pop_cold")
    row("two-tower (id + category MLP)", "warm targets", full, "model_warm")
    if ablation:
        row("two-tower, id only (ablation)", "warm targets", ablation, "model_warm")

    print("\nTarget: the item tower ranks cold items above random for the users whose sessions predict them:")
    for k in args.ks:
        model = [r["model_cold"][f"hr@{k}"] for r in full]
        rand = [r["random_cold"][f"hr@{k}"] for r in full]
        print(f"- HR@{k} on cold targets: {statistics.mean(model):.4f} vs random {statistics.mean(rand):.4f} "
              f"({statistics.mean(model) / statistics.mean(rand):.1f}x); above random in every seed: "
              f"{'yes' if all(m > r for m, r in zip(model, rand)) else 'NO'}")


if __name__ == "__main__":
    main()
