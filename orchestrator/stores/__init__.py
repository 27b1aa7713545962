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

The durable drivers are imported only when their scheme is used.
"""

from __future__ import annotations

from datetime import timedelta

from orchestrator.store import DEFAULT_RETENTION, SagaStore
from orchestrator.stores.memory import MemoryStore
from plumbing.stores import StoreKind, store_kind

__all__ = ["open_store"]


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
    match store_kind(url, "saga store"):
        case StoreKind.MEMORY:
            return MemoryStore(retention)
        case StoreKind.POSTGRES:
            from orchestrator.stores.postgres import PostgresStore

            return PostgresStore(url, retention=retention, connect_timeout=connect_timeout)
        case StoreKind.MONGO:
            from orchestrator.stores.mongo import MongoStore

            return MongoStore.from_url(url, retention=retention, connect_timeout=connect_timeout)
