"""Training throughput: the Lightning pipeline beside a plain PyTorch loop over the same tensors.

Both sides train the same net class (built from the same config, same initial weights), on the same
``PointwiseBatches`` / ``NegativeSampler`` (the data module's own builder: same batch size, same
negatives per positive, same per-epoch seeding) with Adam at the configured learning rate:

* **plain loop**: ``for batch in batches: forward, BCE, backward, Adam step`` - nothing else;
* **Lightning**: ``Trainer.fit`` of the ``NCFTask`` with the data module, built from
  ``conf/trainer/default.yaml`` with validation disabled (``limit_val_batches=0``), no logger,
  no checkpointing, no progress bar, no model summary;
* **batch building alone**: one epoch of iterating the builder without training, so the share of
  step time spent building batches is ``builder time / plain-loop epoch time``.

The three are interleaved for ``--rounds`` rounds; throughput is samples (positives + negatives)
per second over the timed epochs (the first epoch of every fit is a warm-up and not timed), taken
as the median over rounds. Intra-op threads are fixed with ``--threads`` (default 1).

    python bench/ncf_speed.py [--dataset synthetic|ml-100k|both] [--models mf,neumf] [--epochs 3]
        [--rounds 3] [--threads 1] [--batch-size N] [--experiment] [--trainer KEY=VALUE ...] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, LEAN_OVERRIDES, compose_train_config, quiet_lightning, ready_datamodule  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from rectrain.training import build_net_and_task  # noqa: E402

DATASETS = {
    "synthetic": ["data=synthetic"],
    "ml-100k": ["data=movielens", "data.source.root={root}"],
}


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (start of epoch to end of epoch, hooks included)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = clocks()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(pl_module.device)
        self.times.append(since(self._start))


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: CPU time is robust to other jobs on a shared machine."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def rate(samples: int, times: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Samples per wall second and per CPU second over the timed epochs (all but the first), and
    per wall second of the fastest timed epoch (interference from other jobs only ever adds time, so
    the fastest epoch is the least disturbed measurement, as ``timeit`` takes the minimum)."""
    timed = times[1:]
    return (samples * len(timed) / sum(t[0] for t in timed), samples * len(timed) / sum(t[1] for t in timed),
            samples / min(t[0] for t in timed))


def plain_loop(net: torch.nn.Module, batches, lr: float, epochs: int, seed: int,
               device: str = "cpu") -> list[tuple[float, float]]:
    """The hand-written loop: per epoch set the batch seed, then forward, BCE, backward, Adam step."""
    net.to(device).train()
    on_cuda = torch.device(device).type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times = []
    for epoch in range(epochs):
        start = clocks()
        torch.manual_seed(seed * 1000 + epoch)  # same per-epoch dropout seeding as the task
        batches.set_epoch(epoch)
        for batch in batches:
            if on_cuda:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = net(batch["user"], batch["item"])
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(since(start))
    return times


def build_only(batches, epoch: int) -> tuple[float, float]:
    """One epoch of the batch builder alone (negatives drawn, batches sliced), no training."""
    start = clocks()
    batches.set_epoch(epoch)
    for _ in batches:
        pass
    return since(start)


def lightning_fit(task: pl.LightningModule, datamodule, trainer_cfg, epochs: int,
                  extra: dict) -> tuple[list[tuple[float, float]], float]:
    timer = EpochTimer()
    trainer = instantiate(trainer_cfg, callbacks=[timer], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          num_sanity_val_steps=0, max_epochs=epochs, devices=1, **extra)
    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    return timer.times, time.perf_counter() - start


def parse_extra(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
        if isinstance(out[key], str):
            try:
                out[key] = int(value)
            except ValueError:
                pass
    return out


def measure(dataset: str, model: str, args: argparse.Namespace, extra: dict) -> dict:
    overrides = [*LEAN_OVERRIDES, f"model={model}", "seed=0", *[o.format(root=args.data) for o in DATASETS[dataset]]]
    if args.experiment and dataset == "ml-100k":  # the tuned settings: batch size, negatives, lr
        overrides.append(f"experiment=ml100k_{model}")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train_config(overrides, tmp)
        datamodule = ready_datamodule(cfg)
        template = build_net_and_task(cfg, datamodule)
        datamodule.train_spec = template.train_spec
        batches = datamodule.train_batches()  # the builder Lightning iterates, reused by the plain loop
        k = template.train_spec.n_negatives
        samples = batches.users.numel() * (1 + k)
        lr = float(cfg.model.optimizer.lr)
        init_state = copy.deepcopy(template.net.state_dict())
        rows: dict[str, list] = {"plain": [], "lightning": [], "lightning_alt": [], "build": [],
                                 "lightning_fit_wall": []}
        prefetch = datamodule.prefetch
        alternative = 2 if prefetch == 0 else 0
        for _ in range(args.rounds):
            # plain loop
            net = copy.deepcopy(template.net)
            net.load_state_dict(init_state)
            times = plain_loop(net, batches, lr, args.epochs, int(cfg.seed), args.device)
            rows["plain"].append(rate(samples, times))
            # Lightning, a fresh task around a fresh copy of the same initial net
            task = build_net_and_task(cfg, datamodule)
            task.net.load_state_dict(init_state)
            times, wall = lightning_fit(task, datamodule, cfg.trainer, args.epochs, extra)
            rows["lightning"].append(rate(samples, times))
            rows["lightning_fit_wall"].append(samples * len(times) / wall)
            # the same with the other batch pipeline: a background thread building batches ahead
            # (data.prefetch=2) when the config builds them inline between steps, and vice versa
            task = build_net_and_task(cfg, datamodule)
            task.net.load_state_dict(init_state)
            datamodule.prefetch = alternative
            times, _ = lightning_fit(task, datamodule, cfg.trainer, args.epochs, extra)
            datamodule.prefetch = prefetch
            rows["lightning_alt"].append(rate(samples, times))
            # the builder alone
            rows["build"].append(build_only(batches, 1))
        profile = None
        if args.profile:
            task = build_net_and_task(cfg, datamodule)
            prof = cProfile.Profile()
            prof.enable()
            lightning_fit(task, datamodule, cfg.trainer, args.epochs, extra)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile = buf.getvalue()
    plain = statistics.median(r[0] for r in rows["plain"])
    light = statistics.median(r[0] for r in rows["lightning"])
    alt = statistics.median(r[0] for r in rows["lightning_alt"])
    plain_cpu = statistics.median(r[1] for r in rows["plain"])
    light_cpu = statistics.median(r[1] for r in rows["lightning"])
    build_s = statistics.median(r[0] for r in rows["build"])
    build_cpu = statistics.median(r[1] for r in rows["build"])
    return {
        "dataset": dataset, "model": model, "batch_size": int(cfg.data.batch_size), "negatives": k,
        "steps": len(batches), "samples": samples, "plain": plain, "lightning": light,
        "fit_wall": statistics.median(rows["lightning_fit_wall"]), "ratio": light / plain,
        "prefetch": prefetch, "alternative": alternative, "ratio_alt": alt / plain,
        "ratio_cpu": light_cpu / plain_cpu,
        "ratios": [lr[0] / pr[0] for pr, lr in zip(rows["plain"], rows["lightning"])],
        "ratio_best": max(r[2] for r in rows["lightning"]) / max(r[2] for r in rows["plain"]),
        "build_s": build_s, "build_cpu": build_cpu,
        "build_share": build_cpu / (samples / plain_cpu), "build_share_lightning": build_cpu / (samples / light_cpu),
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["synthetic", "ml-100k", "both"], default="both")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k", help="ml-100k folder")
    parser.add_argument("--models", default="mf,neumf", help="comma-separated: mf,gmf,mlp,neumf")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--batch-size", type=int, default=None, help="positives per step (default: config)")
    parser.add_argument("--experiment", action="store_true",
                        help="ml-100k: train with conf/experiment/ml100k_<model>.yaml (the tuned settings)")
    parser.add_argument("--trainer", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra pl.Trainer arguments for the Lightning side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both sides train (the batch builder runs on the CPU either way)")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra Lightning fit")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    torch.set_num_threads(args.threads)
    quiet_lightning()
    extra = {"accelerator": "gpu" if args.device == "cuda" else "cpu", **parse_extra(args.trainer)}

    datasets = ["synthetic", "ml-100k"] if args.dataset == "both" else [args.dataset]
    if "ml-100k" in datasets and not (args.data / "u.data").exists():
        print(f"skipped ml-100k: not found at {args.data} (set RECTRAIN_BENCH_DATA or --data)\n")
        datasets.remove("ml-100k")
    results = [measure(d, m, args, extra) for d in datasets for m in args.models.split(",")]

    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {platform.processor() or platform.machine()}, "
          f"torch.set_num_threads({args.threads}), device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"{torch.get_num_threads()} intra-op threads, {args.rounds} interleaved rounds x {args.epochs} epochs "
          f"(first epoch of each fit untimed), medians; extra Trainer args: {extra or 'none'}\n")
    print("| data | model | batch (pos) | neg/pos | steps/epoch | plain loop samples/s | Lightning samples/s "
          "| Lightning / plain (wall) | per round | fastest epoch, Lightning / plain | Lightning / plain (CPU time) "
          "| Lightning incl. fit setup, samples/s "
          "| Lightning with the other data.prefetch / plain | batch building, CPU s/epoch "
          "| batch building share of step time (plain / Lightning) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['dataset']} | {r['model']} | {r['batch_size']} | {r['negatives']} | {r['steps']} "
              f"| {r['plain']:,.0f} | {r['lightning']:,.0f} | {r['ratio']:.3f} "
              f"| {' '.join(f'{x:.2f}' for x in r['ratios'])} | {r['ratio_best']:.3f} | {r['ratio_cpu']:.3f} "
              f"| {r['fit_wall']:,.0f} "
              f"| {r['ratio_alt']:.3f} (prefetch {r['alternative']}) | {r['build_cpu']:.3f} "
              f"| {r['build_share']:.1%} / {r['build_share_lightning']:.1%} |")
    print("\nsamples = positives + negatives; samples/s are medians over rounds of wall-clock throughput of the "
          "timed epochs; the CPU-time ratio uses this process's CPU seconds instead (robust to other jobs on a "
          "shared machine). Lightning epoch time includes its per-step hooks, DataLoader and logging; 'incl. fit "
          "setup' divides all epochs by the whole Trainer.fit wall time. Batch-building share = CPU time of one "
          "epoch of iterating the batch builder alone / CPU time of a training epoch.")
    for r in results:
        if r["profile"]:
            print(f"\n### cProfile of one Lightning fit: {r['dataset']} / {r['model']}\n```\n{r['profile']}```")


if __name__ == "__main__":
    main()
