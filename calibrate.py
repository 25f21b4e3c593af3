"""Calibrated interaction probabilities: `python calibrate.py ckpt_path=<.ckpt> [key=value ...]`.

Same `key=value` style as train.py and export.py. Fits p = sigmoid(a * score + b) (Platt scaling) on
the validation split, with the training's negative-sampling rate as the prior correction, and reports
ECE (15 bins) and log loss before/after on the test split. Keys:
  ckpt_path        checkpoint written by train.py, NCF family or two-tower (required)
  method           platt (a and b, default) | temperature (a only; b = the prior correction)
  negatives        never-consumed items sampled per user to stand for all of them (default 100)
  max_users        calibrate on at most this many users per split (default: all)
  seed             negative sampling (default 0)
  output           calibration file (default: calibration.json beside the checkpoint); the entry is
                   keyed by the checkpoint's sha256, other checkpoints' entries are kept
  report           directory for reliability.png and calibration.md (default: <stem>-calibration beside it)
  into_checkpoint  true: also write <stem>.calibrated.ckpt carrying ckpt["rectrain"]["calibration"]
  threads          torch intra-op threads (default 1)
  data.<key>       overrides of the checkpoint's data config, e.g. data.source.root=/moved/ml-100k

Needs the `analytics` extra (matplotlib). A thin entry point: rectrain.analytics.calibration.
calibrate_checkpoint does the work. Bad input ends with a one-line message and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Any

from rectrain.cli import UsageError, parse_key_values, require_extra, run_command

KEYS: dict[str, Any] = {"ckpt_path": None, "method": "platt", "negatives": 100, "max_users": None, "seed": 0,
                        "output": None, "report": None, "into_checkpoint": False, "threads": 1}


def parse(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` arguments -> (settings, data overrides)."""
    values, overrides = parse_key_values(argv, KEYS, types={"max_users": int, "output": str, "report": str},
                                         passthrough_prefix="data.")
    if not values["ckpt_path"]:
        raise UsageError("ckpt_path=<checkpoint> is required, e.g. "
                         "python calibrate.py ckpt_path=outputs/mf/<date>/checkpoints/last.ckpt")
    if values["method"] not in ("platt", "temperature"):
        raise UsageError(f"method must be platt or temperature, got {values['method']!r}")
    if values["negatives"] < 1 or values["threads"] < 1 or (values["max_users"] is not None and values["max_users"] < 1):
        raise UsageError("negatives, threads and max_users must be >= 1")
    return values, overrides


def calibrate(parsed: tuple[dict[str, Any], list[str]]) -> str:
    settings, overrides = parsed
    require_extra(("matplotlib",), "calibrate.py", "analytics")
    import torch

    from rectrain.analytics.calibration import calibrate_checkpoint

    torch.set_num_threads(settings["threads"])
    report = calibrate_checkpoint(settings["ckpt_path"], negatives=settings["negatives"], method=settings["method"],
                                  seed=settings["seed"], max_users=settings["max_users"], output=settings["output"],
                                  report_dir=settings["report"], into_checkpoint=settings["into_checkpoint"],
                                  data_overrides=overrides)
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv, __doc__, parse, calibrate)

if __name__ == "__main__":
    sys.exit(main())
