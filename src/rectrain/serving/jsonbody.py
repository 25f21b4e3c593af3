"""Strict JSON request bodies: every way a body can be unusable becomes a RequestError (HTTP 400).

The stdlib decoder accepts what the scorer cannot answer: ``NaN``/``Infinity`` literals, floats that
overflow to infinity, integers longer than Python's int-string conversion limit (a plain
``ValueError``, not a ``JSONDecodeError``), nesting deep enough to exhaust the stack, and lone
surrogates (``"\\ud800"``) that decode to a ``str`` no UTF-8 encoder can write back. Each is refused
here with the reason, so a handler never meets it while answering.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from rectrain.serving.scorer import RequestError

#: the longest integer literal accepted (Python's default int-string conversion limit)
MAX_INT_DIGITS = 4300
#: ``\uD800``..``\uDFFF`` escapes: the only way a JSON text can carry a surrogate (raw bytes cannot)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _no_constant(name: str) -> Any:
    raise RequestError(f"malformed JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"malformed JSON: number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"malformed JSON: integer of {len(text.lstrip('-'))} digits "
                           f"(at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _lone_surrogate(value: Any) -> str | None:
    """Where a lone surrogate sits in a decoded value (None: nowhere)."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the body"
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, v in item.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return f"a key of {where or 'the body'}"
                stack.append((v, f"{where}.{key}" if where else key))
    return None


def parse_json(body: bytes, what: str = "body") -> Any:
    """Decode one UTF-8 JSON text; RequestError (400) with the reason for anything not answerable."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is tolerated, as json.load on bytes does
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # any other refusal of the decoder
        raise RequestError(f"malformed JSON: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(body):
        where = _lone_surrogate(value)
        if where is not None:
            raise RequestError(f"malformed JSON: {where} holds a lone surrogate escape (not a Unicode character)")
    return value
