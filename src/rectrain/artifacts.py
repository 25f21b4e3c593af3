"""The files analytics writes for a checkpoint and export/serving read: segments and calibration.

One numpy-only home for their names, formats, checks and the arithmetic a scorer repeats, so that
``segment.py``/``calibrate.py`` (analytics), ``export.py`` (which embeds both in the ONNX metadata)
and the torch-free scorer cannot drift apart:

* segments: ``<checkpoint stem>-segments/segments.json`` (and ``segments.npz``), centroids in the
  clustered space; a vector's segment is its nearest centroid (:func:`assign_segments`);
* calibration: ``calibration.json`` beside the checkpoint, one entry per checkpoint sha256;
  ``p = sigmoid(a * score + b)`` (:func:`platt_probability`, :class:`Calibration`).

No torch, no scikit-learn: serving imports this module.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rectrain.errors import RectrainError

SEGMENTS_FORMAT = 1
CALIBRATION_FORMAT = 1
SEGMENTS_JSON, SEGMENTS_NPZ = "segments.json", "segments.npz"
CALIBRATION_FILE = "calibration.json"


class ArtifactError(RectrainError):
    """A segments or calibration file is missing, malformed or belongs to another checkpoint."""


# --- segments --------------------------------------------------------------------------------------
def default_segments_path(ckpt_path: str | Path) -> Path:
    """Where ``segment.py`` writes a checkpoint's segments: ``<stem>-segments/segments.json`` beside it."""
    ckpt = Path(ckpt_path)
    return ckpt.parent / f"{ckpt.stem}-segments" / SEGMENTS_JSON


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def assign_segments(vectors: np.ndarray, centroids: np.ndarray, normalize: bool = True) -> np.ndarray:
    """(n, d) vectors -> (n,) index of the nearest centroid (squared Euclidean).

    With ``normalize`` the vectors are L2-normalised first, as they were when the centroids were
    fitted. Segmenting, export (NCF users' segments) and the scorer all assign with this function.
    """
    x = normalize_rows(vectors) if normalize else np.asarray(vectors, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return d2.argmin(axis=1).astype(np.int64)


def write_segments_file(directory: str | Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``segments.json`` (lossless: float32 centroids as float64 decimals) and ``segments.npz``
    (the same: ``centroids`` float32 (k, d) plus ``meta``, a JSON string; loads with allow_pickle=False)."""
    from rectrain.utils.io import atomic_path, write_json_atomic

    directory = Path(directory)
    json_path, npz_path = directory / SEGMENTS_JSON, directory / SEGMENTS_NPZ
    write_json_atomic(json_path, payload)
    meta = {k: v for k, v in payload.items() if k != "centroids"}
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, centroids=np.asarray(payload["centroids"], dtype=np.float32),
                     meta=np.array(json.dumps(meta, sort_keys=True)))
    return json_path, npz_path


def load_segments(path: str | Path) -> dict[str, Any]:
    """Read ``segments.json`` or ``segments.npz`` (or a folder holding the JSON); ``centroids`` comes
    back as a float32 array."""
    p = Path(path)
    if p.is_dir():
        p = p / SEGMENTS_JSON
    if not p.is_file():
        raise ArtifactError(f"segments file not found: {p}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as npz:
            payload = json.loads(str(npz["meta"]))
            payload["centroids"] = npz["centroids"].astype(np.float32)
        return payload
    payload = json.loads(p.read_text())
    payload["centroids"] = np.asarray(payload["centroids"], dtype=np.float32)
    return payload


def check_segments_belong(payload: Mapping[str, Any], path: str | Path, checkpoint_sha256: str,
                          ckpt_path: str | Path) -> None:
    """Segments fitted on another checkpoint must not travel with this one (a file without a
    recorded sha256 is accepted: it predates the record)."""
    recorded = payload.get("checkpoint_sha256")
    if recorded not in (None, "", checkpoint_sha256):
        raise ArtifactError(f"{path} was fitted on another checkpoint (sha256 {recorded[:12]}, this one "
                            f"{checkpoint_sha256[:12]}); run segment.py on {ckpt_path}")


def segments_metadata(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The segments block of the ONNX metadata (what the scorer reads) from a segments payload."""
    centroids = np.asarray(payload["centroids"], dtype=np.float32)
    return {"k": int(centroids.shape[0]), "centroids": centroids.tolist(),
            "normalize": payload.get("normalize", "l2"), "vector": payload.get("vector", {}),
            "distance": "squared_euclidean"}


def centroids_of(metadata: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
    """(k, d) float32 centroids and whether vectors are L2-normalised before assignment."""
    return np.asarray(metadata["centroids"], dtype=np.float32), metadata.get("normalize", "l2") == "l2"


# --- calibration -----------------------------------------------------------------------------------
def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def platt_probability(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt scaling: ``p = sigmoid(a * score + b)`` of raw model scores."""
    return sigmoid(float(a) * np.asarray(scores, dtype=np.float64) + float(b))


def check_calibration_metadata(values: Mapping[str, Any], where: str) -> None:
    """A calibration block must carry ``a`` and ``b`` (ArtifactError naming ``where`` otherwise)."""
    if not isinstance(values, Mapping) or not {"a", "b"} <= set(values):
        raise ArtifactError(f"{where}: calibration metadata needs 'a' and 'b'")


@dataclass
class Calibration:
    """``p = sigmoid(a * score + b)`` and how it was obtained."""

    method: str
    a: float
    b: float
    score: str  # what ``score`` is: "ncf_logit" or "two_tower_score"
    negative_sampling_rate: float | None = None
    prior_correction: float | None = None  # log(negative_sampling_rate)
    fitted_on: str = "valid"
    details: dict[str, Any] = field(default_factory=dict)

    def probability(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw model scores (what the scorer runs)."""
        return platt_probability(scores, self.a, self.b)

    def metadata(self) -> dict[str, Any]:
        """The small dict for ONNX metadata / a scorer: method, a, b, score, formula."""
        return {"method": self.method, "a": self.a, "b": self.b, "score": self.score,
                "formula": "p = 1 / (1 + exp(-(a * score + b)))", "fitted_on": self.fitted_on,
                "negative_sampling_rate": self.negative_sampling_rate}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Calibration":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_calibration_path(ckpt_path: str | Path) -> Path:
    """``calibration.json`` beside the checkpoint (one file for every checkpoint of a run)."""
    return Path(ckpt_path).parent / CALIBRATION_FILE


def write_calibration(path: str | Path, checkpoint_sha256: str, calibration: Calibration) -> Path:
    """Add (or replace) this checkpoint's entry in the calibration file, atomically."""
    from rectrain.utils.io import write_json_atomic

    p = Path(path)
    payload: dict[str, Any] = {"format": CALIBRATION_FORMAT, "checkpoints": {}}
    if p.is_file():
        try:
            existing = json.loads(p.read_text())
            if isinstance(existing, dict) and isinstance(existing.get("checkpoints"), dict):
                payload["checkpoints"] = existing["checkpoints"]
        except json.JSONDecodeError:
            pass  # a broken file is replaced
    payload["checkpoints"][checkpoint_sha256] = calibration.to_dict()
    write_json_atomic(p, payload)
    return p


def stored_calibration(path: str | Path, checkpoint_sha256: str) -> Calibration | None:
    """The entry of the checkpoint with this sha256 in a calibration file, or None."""
    p = Path(path)
    if not p.is_file():
        return None
    entry = json.loads(p.read_text()).get("checkpoints", {}).get(checkpoint_sha256)
    return Calibration.from_dict(entry) if entry else None
