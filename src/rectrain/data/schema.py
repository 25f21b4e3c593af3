"""The canonical shape every reader produces, whatever the file format.

A reader returns a :class:`RawLog`: one row per event in file order with the canonical column
names below. Raw ids are kept as strings (the form a service receives them in), so the vocabularies
built later map ``str -> contiguous index`` for every dataset alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

USER = "user"
ITEM = "item"
TIMESTAMP = "timestamp"
RATING = "rating"
SESSION = "session"

#: columns of RawLog.interactions and their dtypes after validation
INTERACTION_DTYPES = {
    USER: "object",  # str raw id
    ITEM: "object",  # str raw id
    TIMESTAMP: "float64",  # seconds; float keeps sub-second session logs exact enough
    RATING: "float64",  # optional
    SESSION: "object",  # optional str raw id
}


@dataclass
class RawLog:
    """A validated interaction log before any filtering.

    Attributes:
        interactions: columns ``user, item, timestamp`` and optionally ``rating``, ``session``;
            ids are ``str``; rows in file order (the order breaks timestamp ties).
        items: optional item side information: column ``item`` (str) and optionally ``title`` (str)
            and ``categories`` (list of str: genres for MovieLens, categories for synthetic data).
        users: optional user side information: column ``user`` (str) and any feature columns.
        source: a short description for messages (file path or generator settings).
        extra: anything a generator knows that no real log has (true taste groups, ...).
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)
