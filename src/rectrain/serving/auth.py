"""Who may reload the model: a bearer token, required whenever the service is reachable from elsewhere.

``/admin/reload`` replaces what every client is served, so it is open only on a loopback bind
without a token; any other bind needs ``--admin-token`` (or ``RECTRAIN_ADMIN_TOKEN``), sent as
``Authorization: Bearer <token>`` and compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
import os

from rectrain.serving.scorer import RequestError

TOKEN_ENV = "RECTRAIN_ADMIN_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def admin_token(given: str | None = None) -> str | None:
    """The configured token: ``given`` (the CLI flag), else the environment variable; None when unset."""
    token = given if given is not None else os.environ.get(TOKEN_ENV)
    return token or None


def check_bearer(header: str | None, token: str | None) -> None:
    """Raise RequestError 401 (no credentials) or 403 (wrong ones) unless ``header`` carries ``token``."""
    if token is None:
        return
    if not header:
        raise RequestError("this endpoint needs 'Authorization: Bearer <token>' (the service's admin token)", 401)
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise RequestError("the Authorization header must read 'Bearer <token>'", 401)
    if not hmac.compare_digest(credentials.strip().encode("latin-1"), token.encode("utf-8")):
        raise RequestError("wrong admin token", 403)
