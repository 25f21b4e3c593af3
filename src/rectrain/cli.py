"""The ``key=value`` command lines of export.py, segment.py, calibrate.py and compare.py.

train.py is a Hydra app; the other entry points take the same ``key=value`` style without Hydra's
start-up cost. One parser for all of them: typed by the defaults, ``null`` for optional keys, and
``data.<key>=...`` passed through (overrides of the checkpoint's data config). Torch-free.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping


class UsageError(ValueError):
    """A bad command line (printed as one line, exit code 2)."""


def parse_key_values(argv: list[str], defaults: Mapping[str, Any], *, types: Mapping[str, type] | None = None,
                     passthrough_prefix: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Parse ``key=value`` arguments against ``defaults``.

    Args:
        argv: the arguments.
        defaults: every accepted key and its default; the default's type (bool, int, float, str)
            parses the value unless ``types`` names one (for keys whose default is None).
        types: explicit value types for keys whose default does not show it.
        passthrough_prefix: arguments starting with this (e.g. ``data.``) are returned unparsed.

    Returns:
        (settings, passthrough arguments). ``null``/``none``/empty sets a key to None.

    Raises:
        UsageError: naming the argument and the accepted keys.
    """
    types = dict(types or {})
    values, passthrough = dict(defaults), []
    accepted = ", ".join(defaults) + (f", {passthrough_prefix}<key>" if passthrough_prefix else "")
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {arg!r} (keys: {accepted})")
        if passthrough_prefix and key.startswith(passthrough_prefix):
            passthrough.append(arg)
            continue
        if key not in defaults:
            raise UsageError(f"unknown key {key!r} (keys: {accepted})")
        kind = types.get(key) or (type(defaults[key]) if defaults[key] is not None else str)
        try:
            if raw.lower() in ("", "null", "none") and (defaults[key] is None or key in types):
                values[key] = None
            elif kind is bool:
                if raw.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                values[key] = raw.lower() == "true"
            else:
                values[key] = kind(raw)
        except ValueError as exc:
            raise UsageError(f"{key}={raw!r}: {exc}") from None
    return values, passthrough


def run_command(argv: list[str], doc: str | None, parse: Callable[[list[str]], Any],
                work: Callable[[Any], str]) -> int:
    """The shape every ``key=value`` entry point shares: help, parse, work, one-line errors.

    ``parse`` turns argv into settings (raising UsageError); ``work`` does the job and returns the
    summary to print. A UsageError or RectrainError becomes ``error: ...`` on stderr and exit 2.
    """
    from rectrain.errors import RectrainError

    if any(a in ("-h", "--help") for a in argv):
        print(doc or "")
        return 0
    try:
        print(work(parse(argv)))
    except (UsageError, RectrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def require_extra(module_names: tuple[str, ...], command: str, extra: str) -> None:
    """Fail with the install command when an optional dependency is missing."""
    import importlib.util

    missing = [m for m in module_names if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f'{command} needs the {extra} extra ({", ".join(missing)} missing): '
                         f'pip install -e ".[{extra}]"')
