"""Saga stores, picked by URL.

``open_store(url)`` understands:

``memory://``
    :class:`~orchestrator.stores.memory.MemoryStore`: tests and the demo; nothing survives a
    restart.
``postgresql://...`` or ``postgres://...``
    :class:`~orchestrator.stores.postgres.PostgresStore` (asyncpg): one JSONB row per saga in
    the table ``saga_instances``.
``mongodb://...`` or ``mongodb+srv://...``
    :class:`~orchestrator.stores.mongo.MongoStore` (PyMongo's async API): one document per saga
    in the collection ``sagas`` of the database named by the URL's path (default ``saga``).

The durable drivers are imported only when their scheme is used. Every error message that
names a URL names it through :func:`redact_url`, so a password never reaches a log line.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError, StoreUnavailable
from orchestrator.store import DEFAULT_RETENTION, SagaStore
from orchestrator.stores.memory import MemoryStore
from orchestrator.urls import redact_url

__all__ = ["open_store", "redact_url", "store_unavailable"]

POSTGRES_SCHEMES: Final = frozenset({"postgresql", "postgres"})
"""URL schemes served by the PostgreSQL store."""

MONGO_SCHEMES: Final = frozenset({"mongodb", "mongodb+srv"})
"""URL schemes served by the MongoDB store."""

_SUPPORTED = "memory://, postgresql://, postgres://, mongodb:// or mongodb+srv://"
_MAX_REASON = 200


def open_store(
    url: str,
    *,
    retention: timedelta = DEFAULT_RETENTION,
    connect_timeout: float = 5.0,
) -> SagaStore:
    """The saga store that ``url`` names; nothing connects until its first use.

    Args:
        retention: how long a finished saga is kept before ``purge`` (and MongoDB's TTL
            monitor) deletes it.
        connect_timeout: seconds to wait for the server before raising ``StoreUnavailable``.

    Raises:
        ConfigError: the URL's scheme is not supported, or the URL is malformed.
    """
    scheme = _scheme(url)
    if scheme == "memory":
        return MemoryStore(retention)
    if scheme in POSTGRES_SCHEMES:
        from orchestrator.stores.postgres import PostgresStore

        return PostgresStore(url, retention=retention, connect_timeout=connect_timeout)
    if scheme in MONGO_SCHEMES:
        from orchestrator.stores.mongo import MongoStore

        return MongoStore.from_url(url, retention=retention, connect_timeout=connect_timeout)
    raise ConfigError(f"saga store URL {redact_url(url)} is not supported; use {_SUPPORTED}")


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError as e:
        raise ConfigError(f"saga store URL {redact_url(url)} is malformed: {e}") from e


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
