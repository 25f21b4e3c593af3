"""Offline A/B comparison of two exported models: `python compare.py a=<a.onnx> b=<b.onnx|popularity> ...`.

Same `key=value` style as export.py. Keys:
  a, b          ONNX recommend files; `popularity` for the popularity list of the other model
  replay        JSON-lines replay log (raw ids: {"history": [...], "target": id}, NCF also "user")
  ckpt_path     instead of `replay`: build the replay of a checkpoint's held-out split
  stage         with ckpt_path: test (default) or valid
  k             cut-off (default 10)
  bootstrap     bootstrap resamples (default 2000); permutations: same number
  seed          seed of the bootstrap and permutation test (default 0)
  output        directory for comparison.md / comparison.json (default: compare/)
  threads       onnxruntime intra-op threads (default 1)
Prints the markdown report; exit 2 with one line on bad input.
"""
from __future__ import annotations

import sys
from typing import Any

from rectrain.cli import UsageError, parse_key_values

KEYS: dict[str, Any] = {"a": None, "b": None, "replay": None, "ckpt_path": None, "stage": "test", "k": 10,
                        "bootstrap": 2000, "seed": 0, "output": "compare", "threads": 1}


def parse(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments -> settings (see the module docstring)."""
    values, _ = parse_key_values(argv, KEYS, types={"a": str, "b": str, "replay": str, "ckpt_path": str})
    if not values["a"] or not values["b"]:
        raise UsageError("give both a=<model.onnx|popularity> and b=<model.onnx|popularity>")
    if bool(values["replay"]) == bool(values["ckpt_path"]):
        raise UsageError("give exactly one of replay=<log.jsonl> or ckpt_path=<checkpoint>")
    return values


def replay_from_checkpoint(ckpt_path: str, stage: str, needs_users: bool) -> list[dict[str, Any]]:
    """Held-out requests of a checkpoint's data (opens the run: imports torch, unlike the comparison).

    NCF replays carry raw user ids from the run's user vocabulary, read with its sha256 checked, so
    users are never mapped through another run's vocabulary."""
    from rectrain.ab_compare import replay_requests_from_queries
    from rectrain.runs import open_run

    run = open_run(ckpt_path)
    data = run.data()
    users = run.user_vocab().ids if needs_users else None
    return list(replay_requests_from_queries(data.ranking_queries(stage), list(data.item_vocab), users))


def main(argv: list[str]) -> int:
    from rectrain.ab_compare import PopularityRecommender, compare, read_replay, to_markdown, write_report
    from rectrain.errors import RectrainError
    from rectrain.serving import ModelLoadError, Scorer

    try:
        args = parse(argv)
        models: dict[str, Any] = {}
        for name in ("a", "b"):
            if args[name] != "popularity":
                models[name] = Scorer.load(args[name], threads=args["threads"])
        if not models:
            raise ValueError("at least one of a, b must be an ONNX file")
        ref = next(iter(models.values())).model
        for name in ("a", "b"):
            models.setdefault(name, PopularityRecommender.from_model(ref))
        requests = (read_replay(args["replay"]) if args["replay"]
                    else replay_from_checkpoint(args["ckpt_path"], args["stage"], ref.kind == "ncf"))
        report = compare(models["a"], models["b"], requests, k=args["k"], n_boot=args["bootstrap"],
                         n_perm=args["bootstrap"], seed=args["seed"])
    except (ValueError, OSError, ModelLoadError, RectrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = {"A": str(args["a"]), "B": str(args["b"])}
    write_report(report, args["output"], labels)
    print(to_markdown(report, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
