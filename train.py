"""Train a recommender: `python train.py [model=neumf|mf|gmf|mlp] [data=...] [key=value ...]`.

A thin entry point: Hydra composes conf/train.yaml, rectrain.training.train does the work.
Bad input or config ends with a one-line message and exit code 2, not a traceback.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from rectrain.errors import RectrainError

log = logging.getLogger("rectrain")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from rectrain.training import train

    try:
        results = train(cfg)
    except (RectrainError, FloatingPointError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(results["valid"].get(cfg.optimized_metric, float("nan")))


if __name__ == "__main__":
    main()
