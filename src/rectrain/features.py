"""User side features: which raw attributes feed a model, and how they become a vector.

Numpy only, because both sides need the very same encoding: training (``rectrain.tasks``) encodes
the user table once, the scorer (``rectrain.serving``, no torch, no pandas) encodes the attributes a
request sends. The encoder's parameters travel as JSON in the checkpoint and the ONNX metadata.

* numeric attribute (e.g. age): standardised with the training users' mean and std; a missing
  value encodes as the mean (0).
* categorical attribute (e.g. gender, occupation): one-hot over the values the training users
  have; an unseen or missing value encodes as all zeros.

A model gets attributes, never a user id: the user table itself stays out of the model file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class FeatureColumn:
    """One raw attribute and its encoding."""

    name: str
    kind: str  # NUMERIC | CATEGORICAL
    mean: float = 0.0
    std: float = 1.0
    values: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return 1 if self.kind == NUMERIC else len(self.values)

    @property
    def names(self) -> list[str]:
        return [self.name] if self.kind == NUMERIC else [f"{self.name}={v}" for v in self.values]

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """(n,) raw values -> (n, width) float32."""
        if self.kind == NUMERIC:
            x = np.asarray(raw, dtype=np.float64)
            z = np.where(np.isnan(x), 0.0, (x - self.mean) / self.std)
            return z.astype(np.float32)[:, None]
        raw = np.asarray(raw)
        # vectorised over users (a text array from the data); request records arrive as objects
        text = np.char.strip(raw.astype(str)) if raw.dtype.kind == "U" else np.array([_as_text(v) for v in raw], dtype=str)
        values = np.array(self.values, dtype=str)  # sorted at fit time
        out = np.zeros((text.size, values.size), dtype=np.float32)
        if values.size and text.size:
            at = np.minimum(np.searchsorted(values, text), values.size - 1)
            known = values[at] == text
            out[np.flatnonzero(known), at[known]] = 1.0
        return out


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class UserFeatureEncoder:
    """An ordered set of encoded attributes; ``encode_*`` returns (n, width) float32."""

    columns: tuple[FeatureColumn, ...] = field(default_factory=tuple)

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def names(self) -> list[str]:
        return [n for c in self.columns for n in c.names]

    @property
    def attributes(self) -> list[str]:
        return [c.name for c in self.columns]

    @classmethod
    def fit(cls, table: Mapping[str, np.ndarray], names: Sequence[str]) -> "UserFeatureEncoder":
        """Learn the encoding of ``names`` from the training users' ``table`` (column -> (n,) values).

        A column of numbers is numeric, anything else categorical. Raises KeyError naming an
        attribute the table lacks.
        """
        columns = []
        for name in names:
            if name not in table:
                raise KeyError(name)
            raw = np.asarray(table[name])
            if raw.dtype.kind in "iuf":
                x = raw.astype(np.float64)
                finite = x[~np.isnan(x)]
                mean = float(finite.mean()) if finite.size else 0.0
                std = float(finite.std()) if finite.size else 1.0
                columns.append(FeatureColumn(name, NUMERIC, mean=mean, std=std if std > 0 else 1.0))
            else:
                values = sorted({_as_text(v) for v in raw} - {""})
                columns.append(FeatureColumn(name, CATEGORICAL, values=tuple(values)))
        return cls(tuple(columns))

    def encode_columns(self, table: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """(n, width) features of ``n`` users given as columns of raw values."""
        parts = [c.encode(np.asarray(table[c.name])) for c in self.columns]
        return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(len(records), width) features of attribute dicts (a serving request's ``user_features``).

        Missing attributes encode as described in the module docstring; a numeric attribute that
        is not a number raises ValueError naming it; an unknown attribute name raises KeyError.
        """
        known = set(self.attributes)
        for record in records:
            for key in record:
                if key not in known:
                    raise KeyError(key)
        table: dict[str, np.ndarray] = {}
        for c in self.columns:
            values = [record.get(c.name) for record in records]
            if c.kind == NUMERIC:
                numbers = []
                for v in values:
                    if v is None:
                        numbers.append(math.nan)
                    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        raise ValueError(f"user feature {c.name!r} must be a finite number, got {v!r:.40}")
                    else:
                        numbers.append(float(v))
                table[c.name] = np.array(numbers, dtype=np.float64)
            else:
                table[c.name] = np.array(["" if v is None else str(v) for v in values], dtype=object)
        return self.encode_columns(table, len(records))

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [{"name": c.name, "kind": c.kind, "mean": c.mean, "std": c.std, "values": list(c.values)}
                            for c in self.columns], "names": self.names}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any] | None) -> "UserFeatureEncoder":
        if not payload:
            return cls()
        return cls(tuple(FeatureColumn(c["name"], c["kind"], float(c.get("mean", 0.0)), float(c.get("std", 1.0)),
                                       tuple(str(v) for v in c.get("values", ()))) for c in payload["columns"]))


def user_feature_matrix(encoding: Mapping[str, Any] | None, attributes: Mapping[str, np.ndarray],
                        n_users: int) -> np.ndarray | None:
    """(n_users, F) features of every user index with a checkpoint's ``encoding``; None without one."""
    encoder = UserFeatureEncoder.from_dict(encoding)
    return encoder.encode_columns(attributes, n_users) if encoder.columns else None
