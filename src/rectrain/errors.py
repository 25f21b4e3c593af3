"""Errors a user can act on.

Every error raised for bad input says *where* the problem is (file, line, column or config key),
so the entry points can print one line and exit non-zero instead of a traceback.
"""
from __future__ import annotations


class RectrainError(Exception):
    """Base class for errors caused by the user's input or configuration."""


class DataError(RectrainError):
    """A data file cannot be read as declared.

    Args:
        message: what is wrong, in words a user understands.
        path: the file concerned.
        line: 1-based line number in the file (the header is line 1 for delimited files).
        column: the column name concerned.
        key: the config key the user should change (for example ``data.columns.user``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
        key: str | None = None,
    ) -> None:
        self.path, self.line, self.column, self.key = path, line, column, key
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ", ".join(where)
        text = f"{prefix}: {message}" if prefix else message
        if key is not None:
            text += f" (config key: {key})"
        super().__init__(text)


class ConfigError(RectrainError):
    """A configuration value is invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")
