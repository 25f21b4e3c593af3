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
  ann         two-tower ANN index written beside the model as <stem>.ann.faiss: auto (default: ivf when
              the catalog has at least ann_min_items items, else none), ivf, hnsw or none
  ann_min_items  catalog size from which ann=auto builds an index (default 100000)
  ann_recall  recall@10 against exact top-10 the search effort is tuned to (default 0.98)
  ann_m, ann_ef_construction  HNSW degree and build width (default 32, 80)
  ann_fetch   candidates fetched per query from the head and from the index, re-scored
              exactly (default 50)
  ann_head    items with the largest norms scored exactly on every query beside the index (default:
              2% of the catalog, at most 32768; 0: the index alone)
              (threads also sets the faiss build threads)

A thin entry point: rectrain.export.export_checkpoint does the work. Bad input ends with a one-line
message and exit code 2; a failed parity check writes nothing.
"""
from __future__ import annotations

import sys
from typing import Any

from rectrain.cli import UsageError, parse_key_values, run_command

KEYS: dict[str, Any] = {"ckpt_path": None, "output": None, "quantize": False, "opset": 17, "tolerance": 1e-5,
                        "user_vocab": None, "threads": 1, "segments": None, "ann": "auto", "ann_min_items": 100_000,
                        "ann_recall": 0.98, "ann_m": 32, "ann_ef_construction": 80, "ann_fetch": 50, "ann_head": None}


def parse(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments -> settings (see the module docstring)."""
    values, _ = parse_key_values(argv, KEYS, types={"output": str, "user_vocab": str, "segments": str, "ann": str,
                                                         "ann_head": int})
    if not values["ckpt_path"]:
        raise UsageError("ckpt_path=<checkpoint> is required, e.g. "
                         "python export.py ckpt_path=outputs/two_tower/<date>/checkpoints/last.ckpt")
    return values


def export(settings: dict[str, Any]) -> str:
    import torch

    from rectrain.export import export_checkpoint
    from rectrain.export.onnx_export import AnnOptions

    torch.set_num_threads(settings["threads"])
    ann = AnnOptions(kind=settings["ann"] or "none", min_items=settings["ann_min_items"], recall=settings["ann_recall"],
                     m=settings["ann_m"], ef_construction=settings["ann_ef_construction"], fetch=settings["ann_fetch"],
                     head=settings["ann_head"], threads=settings["threads"])
    report = export_checkpoint(settings["ckpt_path"], settings["output"], opset=settings["opset"],
                               tolerance=settings["tolerance"], quantize=settings["quantize"],
                               user_vocab=settings["user_vocab"], segments=settings["segments"], ann=ann)
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv, __doc__, parse, export)

if __name__ == "__main__":
    sys.exit(main())
