"""Train a recommender: `python train.py [model=neumf|mf|gmf|mlp|two_tower] [data=...] [key=value ...]`.

A thin entry point: Hydra composes conf/train.yaml, rectrain.training.train does the work.
A single run that fails on bad input, bad config or a diverged loss prints one line and exits with
status 2. Inside a sweep (-m) the failure is recorded in the run's results.json with its reason
and the sweep goes on (the optimised value is NaN, which Optuna records as a failed trial).
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rectrain.errors import RectrainError

log = logging.getLogger("rectrain")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from rectrain.training import record_failure, train

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    try:
        results = train(cfg, extra={"overrides": overrides})
    except (RectrainError, FloatingPointError) as exc:
        log.error("%s", exc)
        record_failure(cfg, exc, overrides)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return float("nan")
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(results["valid"].get(cfg.optimized_metric, float("nan")))


if __name__ == "__main__":
    main()
