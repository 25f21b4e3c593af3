"""Fail on a bad config value *before* training, naming the key.

Hydra already rejects unknown keys on the command line (the composed config is a struct). What it
cannot know without a schema is that ``model.dim=abc`` should be an int: this module checks the
values a config passes to a ``_target_`` against the type hints of that class's constructor.
"""
from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from rectrain.errors import ConfigError, RectrainError


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets rectrain's own errors through unwrapped.

    Hydra wraps whatever a constructor raises in ``InstantiationException``; a ConfigError or
    DataError already names the key or file, so the entry point should print that, not the wrapper.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(config, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, RectrainError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def resolve_target(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("_target_", f"cannot import {path!r}: {exc}") from exc


def _matches(value: Any, hint: Any) -> bool:
    if hint is inspect.Parameter.empty or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or hint in (dict,):
        return isinstance(value, Mapping)
    return True  # objects, callables, classes: instantiate builds and checks them


def check_constructor_args(target: str, values: Mapping[str, Any], key: str, supplied: Sequence[str] = ()) -> None:
    """Check ``values`` (a resolved config block) against ``target``'s constructor.

    Args:
        target: dotted class path from ``_target_``.
        values: the block's keys and values (Hydra's ``_``-prefixed keys are skipped).
        key: the block's config path for messages (``model.net``).
        supplied: arguments the code passes itself (``n_users``, ``n_items``): not expected in the config.
    """
    cls = resolve_target(target)
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    accepts_any = True
    # a subclass passing **kwargs on to its base: collect the base's arguments too
    for klass in cls.__mro__:
        if not accepts_any or klass is object or "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        parameters.update({n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in
                           (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)})
        try:
            hints = {**typing.get_type_hints(klass.__init__), **hints}
        except Exception:  # unresolvable annotations: check names only
            pass
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        if klass.__module__.startswith(("torch", "pytorch_lightning")):
            break  # the framework's own **kwargs are open-ended
    for name, value in values.items():
        if name.startswith("_") or name in supplied:
            continue
        if name not in parameters:
            if accepts_any:
                continue
            valid = sorted(p for p in parameters if p not in supplied)
            raise ConfigError(f"{key}.{name}", f"{cls.__name__} has no such argument; valid: {valid}")
        if isinstance(value, Mapping) and "_target_" in value:
            continue
        hint = hints.get(name, parameters[name].annotation)
        if not _matches(value, hint):
            choices = _choices(hint)
            if choices is not None:
                raise ConfigError(f"{key}.{name}", f"must be one of {choices}, got {value!r}")
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ConfigError(f"{key}.{name}", f"expected {shown}, got {value!r} ({type(value).__name__})")


def _choices(hint: Any) -> list[Any] | None:
    """The allowed values of a ``Literal[...]`` hint (also inside ``Optional``), else None."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return list(typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        found = [c for h in typing.get_args(hint) for c in (_choices(h) or [])]
        return found or None
    return None
