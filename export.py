"""Export a checkpoint to ONNX: `python export.py ckpt_path=<.ckpt> [output=<model.onnx>] [key=value ...]`.

Same `key=value` style as train.py. Keys:
  ckpt_path   checkpoint written by train.py (required)
  output      main .onnx file (default: the checkpoint's path with .onnx); companions are written beside it
  quantize    true: also write <output stem>.int8.onnx and print its validation NDCG@10 loss (default false)
  opset       ONNX opset (default 17)
  tolerance   parity tolerance, |onnx - torch| <= tolerance * max(1, |torch|) (default 1e-5)
  user_vocab  NCF: user vocabulary sidecar (default: user_vocab.json beside the checkpoint)
  threads     torch intra-op threads while checking parity (default 1)
  segments    segments.json from segment.py (default: <ckpt stem>-segments/segments.json when present);
              a calibration.json from calibrate.py beside the checkpoint is embedded automatically

A thin entry point: rectrain.export.export_checkpoint does the work. Bad input ends with a one-line
message and exit code 2; a failed parity check writes nothing.
"""
from __future__ import annotations

import sys
from typing import Any

from rectrain.cli import UsageError, parse_key_values, run_command

KEYS: dict[str, Any] = {"ckpt_path": None, "output": None, "quantize": False, "opset": 17, "tolerance": 1e-5,
                        "user_vocab": None, "threads": 1, "segments": None}


def parse(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments -> settings (see the module docstring)."""
    values, _ = parse_key_values(argv, KEYS, types={"output": str, "user_vocab": str, "segments": str})
    if not values["ckpt_path"]:
        raise UsageError("ckpt_path=<checkpoint> is required, e.g. "
                         "python export.py ckpt_path=outputs/two_tower/<date>/checkpoints/last.ckpt")
    return values


def export(settings: dict[str, Any]) -> str:
    import torch

    from rectrain.export import export_checkpoint

    torch.set_num_threads(settings["threads"])
    report = export_checkpoint(settings["ckpt_path"], settings["output"], opset=settings["opset"],
                               tolerance=settings["tolerance"], quantize=settings["quantize"],
                               user_vocab=settings["user_vocab"], segments=settings["segments"])
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv, __doc__, parse, export)

if __name__ == "__main__":
    sys.exit(main())
