"""What every store shares: which server a URL names, and how an unreachable one is reported.

The saga stores (:mod:`orchestrator.stores`) and the participants' idempotency stores
(:mod:`participants.idempotency`) pick their backend with :func:`store_kind`, so both accept
the same URLs and refuse the same mistakes with the same sentence. Every error that names a
URL names it through :func:`~plumbing.urls.redact_url`, so a password never reaches a log line.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

from plumbing.errors import ConfigError, StoreUnavailable
from plumbing.urls import redact_url

_MAX_REASON: Final = 200


class StoreKind(StrEnum):
    """The kinds of server a store URL can name."""

    MEMORY = "memory"
    POSTGRES = "postgresql"
    MONGO = "mongodb"


_SCHEMES: Final = {
    "memory": StoreKind.MEMORY,
    "postgresql": StoreKind.POSTGRES,
    "postgres": StoreKind.POSTGRES,
    "mongodb": StoreKind.MONGO,
    "mongodb+srv": StoreKind.MONGO,
}


def store_kind(url: str, what: str) -> StoreKind:
    """The kind of store ``url`` names; ``what`` names the setting in errors ("saga store").

    Schemes are case-insensitive, as RFC 3986 says.

    Raises:
        ConfigError: the URL is malformed or its scheme is not one of ours.
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:
        raise ConfigError(f"{what} URL {redact_url(url)} is malformed: {e}") from e
    kind = _SCHEMES.get(scheme)
    if kind is None:
        supported = ", ".join(f"{name}://" for name in _SCHEMES)
        raise ConfigError(f"{what} URL {redact_url(url)} is not supported; use {supported}")
    return kind


def store_unavailable(
    what: str, where: str, error: BaseException, *, timeout: float | None = None
) -> StoreUnavailable:
    """The one-line error for a store that cannot be reached.

    ``where`` is already safe to show: a redacted URL, or a database name. ``timeout`` is
    named in the message when ``error`` is a bare timeout, which says nothing by itself.

    Drivers put topology dumps and tracebacks-worth of detail in their messages; only the
    first line is kept, so the error reads as one log line.
    """
    lines = str(error).strip().splitlines()
    if not lines and isinstance(error, TimeoutError) and timeout is not None:
        lines = [f"no answer within {timeout:g} s"]
    reason = type(error).__name__
    if lines:
        reason = f"{reason}: {lines[0]}"
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    return StoreUnavailable(f"{what} at {where} is unavailable ({reason})")
