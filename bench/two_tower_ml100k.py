"""The two-tower model (GRU or transformer query tower) on ml-100k beside popularity, item-kNN (and optionally the best tuned NCF model).

Protocol (as bench/baselines_ml100k.py): leave-one-out by time (ties in file order), full ranking of
all 1,682 items with the user's training + validation items masked, score ties broken by the lower
item index. The two-tower model is trained from ``conf/experiment/ml100k_two_tower.yaml`` through
``rectrain.training.train`` once per seed; its best checkpoint (validation NDCG@10) is evaluated on
the test split. Table: mean ± sample standard deviation over seeds. Training seconds per epoch are
the training part alone (validation timed separately), with ``--threads`` intra-op threads.

RecBole 1.2.1's GRU4Rec / SASRec figures (../shared/data/README.md) are under the same protocol,
computed independently (2 threads, every prefix of every sequence re-encoded as a sample).

    python bench/two_tower_ml100k.py [--seeds 0,1,2] [--data ../shared/data/ml-100k] [--threads 1]
        [--experiment ml100k_two_tower | ml100k_two_tower_transformer] [--ncf] [--ncf-models mf,gmf,mlp,neumf] [--set KEY=VALUE ...]
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
    start_seeded_bench,
    ready_datamodule,
    CONF_DIR,
    DEFAULT_DATA,
    LEAN_OVERRIDES,
    TrainEpochTimer,
    compose_train_config,
    encoder_name,
    mean_std,
)


from rectrain.evaluation.baselines import ItemKNN, MostPopular  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking  # noqa: E402
from rectrain.training import train  # noqa: E402

METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10")
REFERENCE = {  # ../shared/data/README.md: RecBole 1.2.1, same protocol, 2 CPU threads, seed 2020
    "RecBole GRU4Rec (reference)": {"hr@10": 0.1410, "ndcg@10": 0.0694, "mrr@10": 0.0481, "epoch_s": 77},
    "RecBole SASRec (reference)": {"hr@10": 0.1326, "ndcg@10": 0.0636, "mrr@10": 0.0429, "epoch_s": 122},
}
NCF_NAMES = {"mf": "MF", "gmf": "GMF", "mlp": "MLP", "neumf": "NeuMF"}


def run_one(experiment: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Train one seed of an experiment; test metrics, epochs and per-epoch training seconds."""
    overrides = [*LEAN_OVERRIDES, f"experiment={experiment}", f"data.source.root={args.data}",
                 f"paths.cache_dir={tmp / 'cache'}", f"seed={seed}", f"torch_threads={args.threads}",
                 "+callbacks.epoch_timer._target_=common.TrainEpochTimer", *args.set]
    cfg = compose_train_config(overrides, tmp / f"{experiment}-seed{seed}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(cfg)
    timer = TrainEpochTimer.runs[-1]
    best = results["best_checkpoint"].rsplit("/", 1)[-1].removeprefix("best-epoch").removesuffix(".ckpt")
    return {"test": results["test"], "valid": results["valid"], "seconds": time.perf_counter() - start,
            "encoder": encoder_name(cfg),
            "epochs": results["epochs_trained"], "best": int(best) if best.isdigit() else -1,
            "epoch_s": statistics.median(timer.train_seconds) if timer.train_seconds else float("nan"),
            "valid_s": statistics.median(timer.valid_seconds) if timer.valid_seconds else float("nan")}


def baselines(args: argparse.Namespace, tmp: Path) -> dict:
    """Most popular and item-kNN on the same prepared data and evaluator."""
    cfg = compose_train_config([*LEAN_OVERRIDES, f"experiment={args.experiment}", f"data.source.root={args.data}",
                                f"paths.cache_dir={tmp / 'cache'}"], tmp / "baselines")
    datamodule = ready_datamodule(cfg)
    data = datamodule.data
    hist = data.history("test")
    queries = data.ranking_queries("test")
    popularity = data.item_popularity("test")
    rows = {}
    for name, model in (("most popular", MostPopular()), ("item-kNN (cosine, full)", ItemKNN())):
        model.fit(hist.user, hist.item, data.n_users, data.n_items)
        rows[name] = evaluate_ranking(model, queries, ks=(10,), item_popularity=popularity).summary()
    print(f"ml-100k: {data.n_users} users, {data.n_items} items, {len(data.train)} train / {len(data.valid)} valid"
          f" / {len(data.test)} test events; {queries.protocol}\n")
    return rows


def set_label(args: argparse.Namespace) -> str:
    return f"; --set {' '.join(args.set)}" if args.set else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--experiment", default="ml100k_two_tower")
    parser.add_argument("--ncf", action="store_true",
                        help="also train the tuned NCF experiments (conf/experiment/ml100k_<model>.yaml) that "
                             "exist and list the best by mean test NDCG@10")
    parser.add_argument("--ncf-models", default="mf,gmf,mlp,neumf")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for the two-tower runs (e.g. trainer.max_epochs=5)")
    args = parser.parse_args()
    seeds = start_seeded_bench(args, "u.data", "ml-100k")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = baselines(args, tmp)
        runs = [run_one(args.experiment, s, args, tmp) for s in seeds]
        ncf: dict[str, list[dict]] = {}
        if args.ncf:
            for m in (x.strip() for x in args.ncf_models.split(",") if x.strip()):
                if (CONF_DIR / "experiment" / f"ml100k_{m}.yaml").exists():
                    ncf_args = argparse.Namespace(**{**vars(args), "set": []})
                    ncf[m] = [run_one(f"ml100k_{m}", s, ncf_args, tmp) for s in seeds]

    print(f"Test, full ranking (leave-one-out, seen items masked, ties -> lower item index), mean ± sd over "
          f"seeds {seeds}; torch.set_num_threads({args.threads}), CPU\n")
    print("| method | HR@10 | NDCG@10 | MRR@10 | coverage@10 | valid NDCG@10 | epochs (best) | train s/epoch "
          "| valid s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in base.items():
        print(f"| {name} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | "
              f"{row['coverage@10']:.4f} | - | - | - | - |")
    best_ncf = None
    if ncf:
        best_ncf = max(ncf, key=lambda m: statistics.mean(r["test"]["ndcg@10"] for r in ncf[m]))
    table = {**({f"{NCF_NAMES.get(m, m)} (experiment=ml100k_{m})": rs for m, rs in ncf.items()}),
             f"two-tower {runs[0]['encoder']} (experiment={args.experiment}{set_label(args)})": runs}
    for name, rs in table.items():
        cells = [mean_std([r["test"][k] for r in rs]) for k in METRICS]
        epochs = ", ".join(f"{r['epochs']} ({r['best']})" for r in rs)
        print(f"| {name} | {' | '.join(cells)} | {mean_std([r['valid']['ndcg@10'] for r in rs])} | {epochs} | "
              f"{statistics.mean(r['epoch_s'] for r in rs):.1f} | {statistics.mean(r['valid_s'] for r in rs):.1f} |")
    for name, row in REFERENCE.items():
        print(f"| {name} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | - | - | - | "
              f"{row['epoch_s']} (2 threads) | - |")

    hr = [r["test"]["hr@10"] for r in runs]
    ndcg = [r["test"]["ndcg@10"] for r in runs]
    print("\nPer seed (HR@10 / NDCG@10, train s/epoch): " + ", ".join(
        f"seed {seed}: {r['test']['hr@10']:.4f} / {r['test']['ndcg@10']:.4f}, {r['epoch_s']:.1f} s"
        for seed, r in zip(seeds, runs)))
    print("\nTargets (test, full ranking):")
    contenders = {name: (row["hr@10"], row["ndcg@10"]) for name, row in base.items()}
    if best_ncf is not None:
        rs = ncf[best_ncf]
        contenders[f"best NCF ({NCF_NAMES.get(best_ncf, best_ncf)}, mean)"] = (
            statistics.mean(r["test"]["hr@10"] for r in rs), statistics.mean(r["test"]["ndcg@10"] for r in rs))
    for name, row in REFERENCE.items():
        contenders[name] = (row["hr@10"], row["ndcg@10"])
    for name, (c_hr, c_ndcg) in contenders.items():
        mean_ok = statistics.mean(hr) > c_hr and statistics.mean(ndcg) > c_ndcg
        every = min(hr) > c_hr and min(ndcg) > c_ndcg
        print(f"- two-tower beats {name} on HR@10 and NDCG@10: {'yes' if mean_ok else 'NO'} on the mean "
              f"({statistics.mean(hr):.4f} vs {c_hr:.4f}, {statistics.mean(ndcg):.4f} vs {c_ndcg:.4f}); "
              f"every seed: {'yes' if every else 'no'} (worst {min(hr):.4f} / {min(ndcg):.4f})")
    epoch_s = statistics.mean(r["epoch_s"] for r in runs)
    reference = REFERENCE["RecBole SASRec (reference)" if runs[0]["encoder"] == "transformer"
                          else "RecBole GRU4Rec (reference)"]["epoch_s"]
    print(f"- training seconds per epoch: {epoch_s:.1f} ({args.threads} thread(s), shared 2-core machine) vs "
          f"RecBole {'SASRec' if runs[0]['encoder'] == 'transformer' else 'GRU4Rec'} {reference} (2 threads): "
          f"{reference / epoch_s:.1f}x faster")


if __name__ == "__main__":
    main()
