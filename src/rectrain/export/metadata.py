"""What an exported ONNX file says about itself (``metadata_props``), so a service needs nothing else.

Every key starts with ``rectrain.``; values are strings, JSON where structured. The item vocabulary
(index -> raw id), titles and popularity (the cold-start fallback) are inside the file. The user
vocabulary of an NCF model is *not* (raw user ids are personal data): it is a sidecar JSON file next
to the model, named and pinned by sha256 in ``rectrain.user_vocab``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

import rectrain
from rectrain.export.graphs import GraphSpec
from rectrain.utils.io import stable_hash

PREFIX = "rectrain."
FORMAT_VERSION = "1"

TIE_RULE = ("score descending; at exactly equal scores the lower item index first (ONNX TopK's rule, the same "
            "as rectrain's evaluator)")
EXCLUSION = ("'exclude' lists item indices per row, -1 padded; they score -inf and never appear in 'items'; "
             "rows with fewer than k allowed items end in (item -1, score -inf) padding, which a client drops")
K_RULE = "0-d int64 input 'k', clamped in the graph to 1..n_items"


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def validation_metrics(ckpt: dict[str, Any], ckpt_path: Path) -> dict[str, Any]:
    """The validation metrics of the weights in ``ckpt``, with where they come from.

    ``results.json`` of the run (when this checkpoint is its best one) holds every metric; otherwise
    the checkpoint callback's monitored score, which is recorded in the very file that holds the weights.
    """
    results = ckpt_path.resolve().parent.parent / "results.json"
    if results.is_file():
        try:
            saved = json.loads(results.read_text())
            best = saved.get("best_checkpoint")
            if best and Path(best).resolve() == ckpt_path.resolve() and saved.get("valid"):
                return {"source": "results.json", "metrics": saved["valid"]}
        except (OSError, ValueError):
            pass
    for name, state in (ckpt.get("callbacks") or {}).items():
        if name.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("current_score") is not None:
            monitor = str(state.get("monitor") or "score")
            return {"source": "checkpoint callback state",
                    "metrics": {monitor.removeprefix("val/"): float(state["current_score"])}}
    return {"source": "none recorded", "metrics": {}}


def common_metadata(facts: dict[str, Any], kind: str, *, opset: int, validation: dict[str, Any],
                    user_vocab: dict[str, Any] | None, checkpoint_sha256: str | None) -> dict[str, str]:
    """Metadata shared by every graph exported from one checkpoint."""
    config = facts.get("config") or {}
    model_config = facts.get("model_config") or {}
    n_items = int(facts.get("n_items") or model_config.get("n_items"))
    item_vocab = [str(v) for v in facts.get("item_vocab") or range(n_items)]
    meta = {
        "format": FORMAT_VERSION,
        "model_kind": kind,
        "model_class": facts.get("model_class", ""),
        "model_config": to_json(model_config),
        "opset": str(opset),
        "n_items": str(n_items),
        "n_users": str(int(facts.get("n_users") or model_config.get("n_users") or 0)),
        "item_vocab": to_json(item_vocab),
        "item_titles": to_json([str(t) for t in facts.get("item_titles") or []]),
        "item_popularity": to_json([int(p) for p in facts.get("item_popularity") or [0] * n_items]),
        "user_vocab": to_json(user_vocab if user_vocab is not None else
                            {"file": None, "reason": "two-tower queries are item histories; the model uses no user ids"}),
        "k": K_RULE,
        "exclusion": EXCLUSION,
        "tie_rule": TIE_RULE,
        "split": str(facts.get("split", "")),
        "mask_seen": to_json(bool(facts.get("mask_seen", True))),
        "config_hash": stable_hash(config) if config else "",
        "model_config_hash": stable_hash(config["model"]) if "model" in config else "",
        "data_fingerprint": str(facts.get("data_fingerprint", "")),
        "validation_metrics": to_json(validation),
        "version": str(facts.get("rectrain_version", "")),
        "export_version": rectrain.__version__,
        "checkpoint_sha256": checkpoint_sha256 or "",
        # the differential-privacy guarantee the weights were trained under (privacy=dp), or none
        "privacy": to_json(facts.get("privacy") or {"mechanism": "none", "differential_privacy": False}),
    }
    if facts.get("segments"):
        meta["segments"] = to_json(facts["segments"])
    if facts.get("calibration"):
        meta["calibration"] = to_json(facts["calibration"])
    if kind == "two_tower":
        meta["max_length"] = str(int(model_config.get("max_length", 50)))
        meta["score"] = "dot(query, item vector) / temperature"
        if facts.get("user_features"):
            meta["user_features"] = to_json(facts["user_features"])
        if facts.get("repeat_bonus"):
            meta["repeat_bonus"] = to_json([float(b) for b in facts["repeat_bonus"]])
            meta["repeat_mode"] = str(facts.get("repeat_mode", "bonus"))
            if meta["repeat_mode"] == "mixture":
                meta["score"] = ("log(p * P_repeat + (1 - p) * softmax(query . item vectors / temperature)): "
                                 "P_repeat attends over the history; needs the whole catalog")
            else:
                meta["score"] += (" + sum of the query graph's repeat_bonus[min(r, slots - 1)] over the item's "
                                  "occurrences r positions back from the last history item")
    else:
        meta["score"] = "the model's logit for (user, item); higher is better"
    return meta


def graph_metadata(spec: GraphSpec, parity: dict[str, Any] | None) -> dict[str, str]:
    """The keys that differ per graph: which graph, its inputs/outputs, its parity figures."""
    meta = {"graph": spec.name, "inputs": to_json([t.as_dict() for t in spec.inputs]),
            "outputs": to_json([t.as_dict() for t in spec.outputs])}
    if parity is not None:
        meta["parity"] = to_json(parity)
    return meta


def attach(model: onnx.ModelProto, meta: dict[str, str], doc: str) -> None:
    """Replace the model's rectrain metadata with ``meta`` (keys without the prefix) and set its doc fields."""
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key in sorted(meta):
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + key, str(meta[key])
    model.producer_name = "rectrain"
    model.producer_version = rectrain.__version__
    model.doc_string = doc


def read(model: onnx.ModelProto) -> dict[str, str]:
    """The rectrain metadata of a model, keys without the prefix."""
    return {p.key.removeprefix(PREFIX): p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
