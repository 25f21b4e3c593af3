"""Customer segments: do k-means segments of learned user vectors recover known taste groups?

Synthetic data (``conf/data/synthetic.yaml``: 2,000 users drawn from 8 taste groups over 20 item
categories; the true group of every user is kept by the generator): an MF model and a two-tower GRU
are trained briefly through ``rectrain.training.train``, their user vectors (MF user embedding;
two-tower query vector of the whole history) are clustered with k-means, k = 8, and the adjusted Rand
index (ARI) of the segments against the true groups is printed next to k-means on raw item-count
vectors (L2-normalised rows of the user x item count matrix), k-means on category-count vectors (uses
the item side information: a reference, not a competitor) and random assignment (mean of 20 draws).
k chosen by silhouette over 2-12 is reported too.

ml-100k (``--data``, skipped when absent): MF with the tuned ``experiment=ml100k_mf`` settings
(``--ml100k-epochs`` caps training), segmented with k = 8; prints the compact profile table.

    python bench/segments.py [--seeds 0] [--epochs N] [--skip-ml100k] [--workdir DIR]

``--workdir`` keeps the trained checkpoints; ``bench/calibration.py --workdir`` with the same
folder reuses them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, LEAN_OVERRIDES, compose_train_config, quiet_lightning  # noqa: E402

import numpy as np  # noqa: E402

#: brief training for the synthetic models. Tried here (seed 42, ARI of the MF segments): the
#: default lr 0.002 for 6 epochs 0.53, 20 epochs 0.90; lr 0.01 for 10 epochs 0.88. Two-tower: lr 0.002
#: 6 epochs 0.15, 12 epochs 0.67; lr 0.006 batch 32 for 8 epochs 0.78 (undertrained user vectors
#: segment badly: the ARI follows validation NDCG@10).
SYNTHETIC_MODELS = {
    "mf": ["model=mf", "model.dim=32", "model.optimizer.lr=0.01", "trainer.max_epochs=10"],
    "two_tower": ["model=two_tower", "model.dim=32", "model.net.hidden=64", "model.optimizer.lr=0.006",
                  "data.batch_size=32", "trainer.max_epochs=8"],
}


def train_once(workdir: Path, name: str, overrides: list[str]) -> str:
    """Train (or reuse from ``workdir``) one run; returns its best checkpoint path."""
    from rectrain.training import train
    from rectrain.utils.io import stable_hash

    out = workdir / f"{name}-{stable_hash(overrides, 8)}"  # reused only with the very same overrides
    results_file = out / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        if results.get("status") == "completed" and Path(results["best_checkpoint"]).is_file():
            return results["best_checkpoint"]
    cfg = compose_train_config([*LEAN_OVERRIDES, f"paths.cache_dir={workdir / 'cache'}", *overrides], out)
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(cfg)
    return results["best_checkpoint"]


def synthetic_overrides(model: str, seed: int, epochs: int | None = None) -> list[str]:
    return [*SYNTHETIC_MODELS[model], f"seed={seed}", *([f"trainer.max_epochs={epochs}"] if epochs else [])]


def true_groups(data, source_params: dict) -> np.ndarray:
    """The generator's taste group of every user index (raw user id = the generator's user number)."""
    from rectrain.data.synthetic import generate_synthetic

    groups = generate_synthetic(**source_params).extra["user_group"]
    return groups[data.user_vocab.astype(np.int64)]


def count_vectors(data, by_category: bool = False) -> np.ndarray:
    """(n_users, n_items) (or n_categories) event counts over the whole log, rows L2-normalised."""
    from rectrain.analytics.reports import all_events
    from rectrain.analytics.segments import normalize_rows

    user, item = all_events(data)
    counts = np.zeros((data.n_users, data.n_items), dtype=np.float32)
    np.add.at(counts, (user, item), 1.0)
    if by_category:
        counts = counts @ data.item_category_matrix()
    return normalize_rows(counts)


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from rectrain.analytics.segments import fit_segments

    return fit_segments(x, k, seed=seed, normalize=False).labels


def synthetic(args: argparse.Namespace, workdir: Path) -> None:
    from omegaconf import OmegaConf
    from sklearn.metrics import adjusted_rand_score

    from rectrain.analytics.common import load_model_and_data
    from rectrain.analytics.segments import fit_segments
    from rectrain.analytics.user_vectors import user_vectors

    rows: dict[str, list[float]] = {}
    chosen: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        truth = data = None
        for model in SYNTHETIC_MODELS:
            started = time.perf_counter()
            ckpt = train_once(workdir, f"synthetic-{model}-seed{seed}", synthetic_overrides(model, seed, args.epochs))
            seconds[f"train {model}"] = seconds.get(f"train {model}", 0.0) + time.perf_counter() - started
            loaded = load_model_and_data(ckpt)
            data = loaded.data()
            if truth is None:
                params = OmegaConf.to_container(loaded.config.data.source, resolve=True)
                params.pop("_target_", None)
                truth = true_groups(data, params)
            started = time.perf_counter()
            vectors = user_vectors(loaded.net, data).vectors
            fit = fit_segments(vectors, 8, seed=seed)
            seconds[f"segment {model}"] = seconds.get(f"segment {model}", 0.0) + time.perf_counter() - started
            name = {"mf": "MF user embedding", "two_tower": "two-tower query vector"}[model]
            rows.setdefault(f"k-means on {name} (k=8)", []).append(adjusted_rand_score(truth, fit.labels))
            auto = fit_segments(vectors, None, (2, 12), seed=seed)
            chosen.setdefault(name, []).append(f"k={auto.k} (ARI {adjusted_rand_score(truth, auto.labels):.3f})")
        rows.setdefault("k-means on raw item-count vectors (k=8)", []).append(
            adjusted_rand_score(truth, kmeans_labels(count_vectors(data), 8, seed)))
        rows.setdefault("k-means on category-count vectors (k=8; uses item categories)", []).append(
            adjusted_rand_score(truth, kmeans_labels(count_vectors(data, by_category=True), 8, seed)))
        rng = np.random.default_rng(seed)
        rows.setdefault("random assignment (k=8, mean of 20)", []).append(
            float(np.mean([adjusted_rand_score(truth, rng.integers(0, 8, truth.size)) for _ in range(20)])))

    print(f"### Segment recovery on synthetic data ({data.n_users} users, {data.n_items} items, 8 true taste groups; "
          f"seeds {','.join(map(str, args.seeds))}; MF dim 32 lr 0.01 10 epochs, two-tower GRU dim 32 lr 0.006 "
          f"8 epochs{'' if args.epochs is None else f' (all: {args.epochs} epochs)'})\n")
    print("| user vectors | ARI vs true groups |\n|---|---:|")
    for name, values in rows.items():
        text = f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        print(f"| {name} | {text} |")
    print("\nk chosen by silhouette over 2-12: " + "; ".join(f"{n}: {', '.join(v)}" for n, v in chosen.items()))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + "\n")


def ml100k(args: argparse.Namespace, workdir: Path) -> None:
    from rectrain.analytics.reports import profiles_markdown, segment_checkpoint

    root = Path(args.data)
    if not (root / "u.data").is_file():
        print(f"skipped ml-100k: not found at {root} (set --data or RECTRAIN_BENCH_DATA)")
        return
    started = time.perf_counter()
    ckpt = train_once(workdir, "ml100k-mf", ["experiment=ml100k_mf", f"data.source.root={root}", "seed=0",
                                            f"trainer.max_epochs={args.ml100k_epochs}"])
    trained = time.perf_counter() - started
    report = segment_checkpoint(ckpt, k=8, output=workdir / "ml100k-mf-segments", seed=0)
    print(f"### ml-100k segments, MF (experiment=ml100k_mf, <= {args.ml100k_epochs} epochs), k=8, "
          f"silhouette {report.fit.silhouette[8]:.3f}\n")
    print(profiles_markdown(report.profiles, compact=True))
    print("\ntop items (lift) per segment:")
    for r in report.profiles.summary.itertuples():
        print(f"- {r.segment}: {r.top_items}")
    print(f"\nreport: {report.output} (train {trained:.0f} s)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated training / k-means seeds")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the synthetic models (default: MF 10, two-tower 8)")
    parser.add_argument("--ml100k-epochs", type=int, default=12)
    parser.add_argument("--data", default=str(DEFAULT_DATA / "ml-100k"))
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) trained checkpoints here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    quiet_lightning()
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.skip_synthetic:
            synthetic(args, workdir)
        if not args.skip_ml100k:
            ml100k(args, workdir)


if __name__ == "__main__":
    main()
